"""A run config version published while workers train reaches every running worker at one
global step, and peers on different versions never average together.

Real daemons over loopback: the run's owner publishes version 1 at start; two peers join the
run by id and train the tiny model. Mid-run the owner publishes version 2 (another learning
rate, shorter rounds) to apply from global step 60, far enough ahead for the daemons to
read it first.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dandelion_p2p.identity import Identity, write_identity
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker import protocol
from dandelion_p2p.worker.shm import SharedVector
from tests.daemon_proc import DaemonProcess, launch_daemon, start_daemon, start_daemons
from tests.sync.test_swarm_training import read_jsonl, wait_for
from tests.worker.runconfigs import tiny_run

SWITCH_AT = 60
LAST_STEP = 68
LEAD = 45
"""Steps at least between publishing version 2 and the step it is in force from: more than a
daemon's watch interval (5 s, ``dataset.service.WATCH_INTERVAL``) of training, at the pace
of a quiet machine's rounds."""


def start_owner(tmp_path: Path, config: RunConfig) -> tuple[DaemonProcess, str]:
    """The run owner's daemon (no worker), publishing ``config`` as version 1; and the run id."""
    owner = Identity.generate()
    owner_dir = tmp_path / "owner"
    owner_dir.mkdir()
    write_identity(owner_dir / "identity.key", owner)
    (tmp_path / "run.toml").write_text(config.to_toml())
    daemon = start_daemon("daemon", [
        "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public", "--no-worker",
        "--run-config", str(tmp_path / "run.toml")], owner_dir)
    return daemon, derive_run_id(owner.peer_id_bytes, config.name)


def launch_peer(tmp_path: Path, name: str, run: str, owner: DaemonProcess,
                images: Path | None) -> DaemonProcess:
    """A peer's daemon joining ``run``, launched (``start_daemons`` waits until it is ready)."""
    data_dir = tmp_path / name
    data_dir.mkdir()
    if images is not None:
        shutil.copytree(images, data_dir / "training-data")
    return launch_daemon("daemon", [
        "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public",
        "--worker" if images is not None else "--no-worker", "--run", run,
        "--bootstrap", owner.addrs[0]], data_dir)


def wait_for_version(daemon: DaemonProcess, run: str, version: int) -> None:
    deadline = time.monotonic() + 30
    while daemon.call("runconfig.get", {"run": run})["version"] < version:
        assert time.monotonic() < deadline, f"version {version} never reached {daemon.peer_id}"
        time.sleep(0.2)


# The blocking mode's twin of the default (overlapped) one runs with the slow suite.
@pytest.mark.parametrize("overlap", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["blocking", "overlap"])
def test_a_new_version_applies_on_every_running_worker_at_the_same_global_step(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess], overlap: bool
) -> None:
    first = tiny_run(tiny_sd1, training={"max_steps": LAST_STEP, "batch_size": 2},
                     optimizer={"name": "adamw", "lr": 1e-3},
                     sync={"local_steps": 3, "overlap": overlap},
                     checkpoint={"every_steps": 3, "keep_last": 2})
    second = tiny_run(tiny_sd1, training={"max_steps": LAST_STEP, "batch_size": 2},
                      optimizer={"name": "adamw", "lr": 4e-4},
                      sync={"local_steps": 2, "overlap": overlap},
                      checkpoint={"every_steps": 3, "keep_last": 2})
    owner, run = start_owner(tmp_path, first)
    daemons.append(owner)
    peers = start_daemons([launch_peer(tmp_path, f"peer{i}", run, owner, images)
                           for i in range(2)])
    daemons.extend(peers)

    states = wait_for(peers, lambda s: all(x["global_step"] >= 3 for x in s), "step 3")
    assert max(s["global_step"] for s in states) < SWITCH_AT - LEAD, "published too late"
    published = owner.call("runconfig.publish", {"toml": second.to_toml(),
                                                 "at_step": SWITCH_AT})
    assert (published["run"], published["version"]) == (run, 2)

    final = wait_for(peers, lambda s: all(x["state"] == "stopped" for x in s), "the end")
    assert [s["global_step"] for s in final] == [LAST_STEP, LAST_STEP]
    works = [p.data_dir / "worker" / "tiny" for p in peers]
    for peer, work in zip(peers, works, strict=True):
        logs = peer.logs()
        assert f"applying run config version 2 at global step {SWITCH_AT}" in logs, logs[-6000:]
        # The entry of step s is the optimizer step from s - 1 to s, at the rate of the
        # version in force at s - 1: the old one up to SWITCH_AT, the new one from then on.
        rates = {e["step"]: e["lr"] for e in read_jsonl(work / "train_log.jsonl")}
        assert all(rates[s] == pytest.approx(1e-3) for s in rates if s <= SWITCH_AT), rates
        assert all(rates[s] == pytest.approx(4e-4) for s in rates if s > SWITCH_AT), rates

    rounds = [{(e["config_version"], e["round"]): e
               for e in read_jsonl(work / "sync_log.jsonl")} for work in works]
    assert set(rounds[0]) == set(rounds[1])
    for (version, round_), entry in rounds[0].items():
        # Version 1 ends rounds every 3 steps up to SWITCH_AT, version 2 every 2 steps after.
        # An overlapped round is applied after its boundary, which its entry names.
        step = entry["boundary"] if overlap else entry["global_step"]
        assert step <= entry["global_step"], entry
        assert (version, step % (3 if version == 1 else 2)) == (
            1 if step <= SWITCH_AT else 2, 0), entry
        other = rounds[1][(version, round_)]
        assert entry["members"] == other["members"] == 2, (entry, other)
        assert entry["fraction_averaged"] == 1.0
        assert entry["digest"] == other["digest"], f"round {round_} of version {version}"
    assert {version for version, _ in rounds[0]} == {1, 2}
    assert published["effective_step"] == SWITCH_AT


def test_a_worker_that_trained_a_round_under_an_old_version_is_not_averaged(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    first = tiny_run(tmp_path / "model-not-needed", sync={"local_steps": 3})
    second = tiny_run(tmp_path / "model-not-needed", optimizer={"name": "adamw", "lr": 5e-4},
                      sync={"local_steps": 3})
    owner, run = start_owner(tmp_path, first)
    daemons.append(owner)
    (peer,) = start_daemons([launch_peer(tmp_path, "peer", run, owner, None)])
    daemons.append(peer)
    wait_for_version(peer, run, 1)

    hello = peer.call(protocol.HELLO, {"protocol": protocol.PROTOCOL_VERSION, "pid": 1})
    assert [(c["version"], c["effective_step"]) for c in hello["run_configs"]] == [(1, 0)]
    session = hello["session"]
    path = peer.call(protocol.BUFFER, {"session": session, "elements": 64})["path"]
    shared = SharedVector(Path(path), 64, create=False)
    shared.array[:] = np.arange(64, dtype=np.float32)

    published = owner.call("runconfig.publish", {"toml": second.to_toml(), "at_step": 7})
    assert published["effective_step"] == 9, "rounded up to a round boundary of version 1"
    wait_for_version(peer, run, 2)

    # The round that starts at step 9 is version 2's; this worker trained it under version 1.
    answer: dict[str, Any] = peer.call(protocol.SYNC, {
        "session": session, "round": 4, "weight": 1.0, "kind": "local_steps",
        "config_version": 1, "step": 9, "known_version": 1})
    assert answer["averaged"] is False and answer["behind"] is True
    assert [(c["version"], c["effective_step"]) for c in answer["run_configs"]] == [(2, 9)]
    assert "lr = 0.0005" in answer["run_configs"][0]["toml"]
    assert np.array_equal(shared.array, np.arange(64, dtype=np.float32)), "left untouched"
    assert "trained under config version 1, but version 2 is in force" in peer.logs()
    shared.close()
