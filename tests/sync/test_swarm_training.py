"""Two daemons and their workers train one run together over loopback.

Local-steps mode with blocking rounds (overlapped ones: test_overlap_training.py): the loss
falls, after every sync both peers hold the same weights, and a worker killed mid-run is
restarted by its daemon, resumes from its checkpoint and rejoins.
Gradient mode: two peers with batch b follow exactly the path of one process with batch 2b.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dandelion_p2p.runconfig.schema import RunConfig
from tests.daemon_proc import DaemonProcess, start_daemon
from tests.worker.runconfigs import tiny_run
from tests.worker_logs import replayed_rounds, sync_log

TIMEOUT = 300.0


def start_peer(tmp_path: Path, index: int, images: Path, out: list[DaemonProcess], *,
               worker: bool = True, ready_timeout: float = 30.0) -> DaemonProcess:
    """Peer ``index`` of the run in ``tmp_path/run.toml``, with its own copy of ``images``,
    bootstrapped from the first of ``out`` (if any); appended to ``out``."""
    data_dir = tmp_path / f"peer{index}"
    data_dir.mkdir()
    shutil.copytree(images, data_dir / "training-data")
    args = ["--no-webui", "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public",
            "--run-config", str(tmp_path / "run.toml"), "--worker" if worker else "--no-worker"]
    if out:
        args += ["--bootstrap", out[0].addrs[0]]
    daemon = start_daemon("daemon", args, data_dir, ready_timeout=ready_timeout)
    out.append(daemon)
    return daemon


def start_peers(tmp_path: Path, config: RunConfig, images: Path, n: int,
                out: list[DaemonProcess], *, worker: bool = True,
                ready_timeout: float = 30.0) -> list[DaemonProcess]:
    (tmp_path / "run.toml").write_text(config.to_toml())
    for i in range(n):
        start_peer(tmp_path, i, images, out, worker=worker, ready_timeout=ready_timeout)
    return out


def wait_for(daemons: list[DaemonProcess], done: Any, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        states = [d.call("training.status") for d in daemons]
        if done(states):
            return states
        time.sleep(0.1)
    logs = "\n\n".join(d.logs()[-6000:] for d in daemons)
    raise AssertionError(f"timed out waiting for {what}: {states}\n{logs}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_round(work: Path) -> dict[int, dict[str, Any]]:
    """The last record of every round (a restarted worker may repeat one)."""
    return {entry["round"]: entry for entry in read_jsonl(work / "sync_log.jsonl")}


def test_local_steps_peers_stay_identical_and_a_killed_worker_rejoins(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 12, "batch_size": 2},
                      sync={"local_steps": 3, "overlap": False},
                      checkpoint={"every_steps": 3, "keep_last": 2})
    a, b = start_peers(tmp_path, config, images, 2, daemons)

    # Kill b's worker between two syncs, once it has a checkpoint to come back to.
    states = wait_for([b], lambda s: s[0]["global_step"] >= 4 and s[0]["state"] == "training"
                      and s[0]["pid"], "step 4")
    os.kill(states[0]["pid"], signal.SIGKILL)
    wait_for([b], lambda s: s[0]["crashes"] >= 1, "the crash to be seen")
    assert "the worker was killed by SIGKILL" in b.logs()

    final = wait_for([a, b], lambda s: all(x["state"] == "stopped" for x in s), "the end")
    assert [s["global_step"] for s in final] == [12, 12]
    assert final[1]["crashes"] == 1 and final[0]["crashes"] == 0
    # The last round averaged the two: each status names both (the web UI lists them).
    for state in final:
        assert sorted(state["last_round"]["peers"]) == sorted([a.peer_id, b.peer_id]), state
    assert "resumed from checkpoint" in b.logs()

    work_a, work_b = (d.data_dir / "worker" / "tiny" for d in (a, b))
    rounds_a, rounds_b = by_round(work_a), by_round(work_b)
    assert sorted(rounds_a) == [1, 2, 3, 4]
    # Killed in the middle of a round, b's daemon may finish that round with a; b's worker
    # then comes back behind and fetches the swarm's state instead of repeating the round.
    assert {1, 3, 4} <= set(rounds_b) <= set(rounds_a)
    for r in rounds_b:
        assert rounds_a[r]["members"] == rounds_b[r]["members"] == 2, r
        assert rounds_a[r]["fraction_averaged"] == 1.0
        assert rounds_a[r]["digest"] == rounds_b[r]["digest"], f"round {r} differs"

    weights_a = load_file(work_a / "checkpoints/step-00000012/trainable.safetensors")
    weights_b = load_file(work_b / "checkpoints/step-00000012/trainable.safetensors")
    assert max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a) <= 1e-6

    for work in (work_a, work_b):
        losses = [e["loss"] for e in read_jsonl(work / "train_log.jsonl")]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    status = a.call("status")
    assert status["training"]["state"] == "stopped"


def test_gradient_mode_two_peers_match_one_with_twice_the_batch(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    steps, b = 4, 2
    # Adam divides by sqrt(v) + eps: with a tiny eps, a gradient element near zero whose
    # rounding differs between the two summation orders steps by a full +-lr either way. A
    # large eps keeps every update proportional to its gradient, so the comparison measures
    # the averaging, not Adam's sensitivity to rounding.
    config = tiny_run(tiny_sd1, training={"max_steps": steps, "batch_size": b},
                      optimizer={"name": "adamw", "lr": 2e-2, "eps": 0.1, "weight_decay": 0.0},
                      sync={"mode": "gradient", "target_batch": 2 * b},
                      checkpoint={"every_steps": steps, "keep_last": 1})
    (tmp_path / "swarm").mkdir()
    pair = start_peers(tmp_path / "swarm", config, images, 2, daemons, worker=False)
    workers = []
    for i, daemon in enumerate(pair):
        # `dandelion-p2p worker` against a running daemon, each peer with half the data.
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "dandelion_p2p.cli", "worker", "--data-dir",
             str(daemon.data_dir), "--data", str(images), "--shard", f"{i}/2", "--no-export"],
            stdout=subprocess.DEVNULL, stderr=(daemon.data_dir / "worker.log").open("w"),
        ))
    try:
        from dandelion_p2p.worker.link import SoloLink
        from dandelion_p2p.worker.train import Trainer, WorkerOptions

        single = replace(config, training=replace(config.training, batch_size=2 * b))
        (tmp_path / "single.toml").write_text(single.to_toml())
        reference = Trainer(single, WorkerOptions(data=images, work_dir=tmp_path / "single",
                                                  shard=(0, 1), export=False),
                            SoloLink(tmp_path / "single.toml"))
        reference.resume()
        reference.run()
        reference.close()
        for worker in workers:
            assert worker.wait(timeout=TIMEOUT) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    peers = [load_file(d.data_dir / "worker/tiny/checkpoints/step-00000004/trainable.safetensors")
             for d in pair]
    rounds = [read_jsonl(d.data_dir / "worker/tiny/sync_log.jsonl") for d in pair]
    assert all(r["members"] == 2 and r["fraction_averaged"] == 1.0 for r in rounds[0] + rounds[1])
    moved = 0.0
    for name, param in reference.c.trainable:
        assert torch.equal(peers[0][name], peers[1][name]), name
        moved = max(moved, float((param.detach() - peers[0][name]).abs().max()))
    assert moved <= 1e-5
    start = load_file(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    change = max(float((peers[0]["unet." + k] - v).abs().max()) for k, v in start.items())
    assert change > 100 * moved, "the weights moved far more than the two paths differ"


def joined_rounds(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in sync_log(daemon) if e["averaged"] and e["members"] == 3]


def rounds_around(r: int, logs: list[dict[int, dict[str, Any]]], joiner: DaemonProcess) -> str:
    """What each peer's sync log says of the rounds near ``r``, and the joiner's log lines of
    its download and rounds: a divergence's story."""
    keys = ("members", "averaged", "fraction_averaged", "global_step", "digest")
    lines = [f"round {r} differs"]
    for n, log in enumerate(logs):
        for k in range(r - 3, r + 2):
            if k in log:
                lines.append(f"peer {n} round {k}: " + ", ".join(f"{key}={log[k].get(key)}"
                                                                  for key in keys))
    lines += [line for line in joiner.logs().splitlines()
              if any(w in line for w in ("round", "download", "join", "state"))][-80:]
    return "\n".join(lines)


# Blocking rounds' joiner: the default (overlapped) mode's joiner runs in the default suite
# (test_overlap_training); both go through the same joining code.
@pytest.mark.slow
def test_a_third_peer_joins_mid_run_with_the_swarms_state(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # A run far longer than the test: it ends once the newcomer has trained with the pair.
    # The newcomer, just done downloading, must reach a round before the pair's gathering
    # window closes: this test keeps the window of half a second it was written with.
    config = tiny_run(tiny_sd1, training={"max_steps": 3000, "batch_size": 2},
                      sync={"local_steps": 3, "overlap": False},
                      checkpoint={"every_steps": 3, "keep_last": 2},
                      averaging={"gather_window": 0.5})
    a, b = start_peers(tmp_path, config, images, 2, daemons)
    wait_for([a], lambda s: s[0]["global_step"] >= 6, "the pair to pass round 2")

    c = start_peer(tmp_path, 2, images, daemons)
    wait_for([c], lambda s: sum(e["fraction_averaged"] == 1.0 for e in joined_rounds(c)) >= 3,
             "three rounds of all three peers")
    for daemon in (a, b, c):
        daemon.call("training.stop")
    wait_for([a, b, c], lambda s: all(x["state"] == "stopped" for x in s), "the stop")
    assert "downloaded the state at step" in c.logs(), c.logs()[-5000:]
    print("rounds replayed:", replayed_rounds(c.logs(), 3))

    rounds = [by_round(d.data_dir / "worker" / "tiny") for d in (a, b)]
    newcomer = {e["round"]: e for e in joined_rounds(c)}
    first = min(newcomer)
    assert first > 2, "the newcomer joined after the pair had trained"
    shared = [r for r in newcomer if r in rounds[0] and r in rounds[1]]
    # Every round the three took part in leaves them the same weights, whether it averaged
    # in full or not (on a loaded machine a round of three can end partial on some members
    # and failed on another: no peer applies it).
    for r in shared:
        same = rounds[0][r]["digest"] == rounds[1][r]["digest"] == newcomer[r]["digest"]
        assert same, rounds_around(r, [*rounds, by_round(c.data_dir / "worker" / "tiny")], c)
    in_full = [r for r in shared
               if all(x[r]["members"] == 3 and x[r]["fraction_averaged"] == 1.0
                      for x in (*rounds, newcomer))]
    assert len(in_full) >= 3, shared
