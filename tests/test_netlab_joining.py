"""A joiner whose state download outlasts several sync intervals still joins.

Three daemons with their workers on public hosts of a network lab; the joiner's downlink is
capped (tc) so that the swarm's state (the outer optimizer's, all a local-steps joiner
downloads) takes several rounds to arrive. Once the state is in,
the joiner fetches the averaged rounds the pair kept since and applies them: from its first
round with the others on, it holds their weights bit for bit.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from dandelion_p2p.netlab import NetLab
from tests.daemon_proc import DaemonProcess, start_daemon
from tests.worker.runconfigs import tiny_run
from tests.worker_logs import held_swarm_weights_at, logged_at, sync_interval, sync_log

pytestmark = [pytest.mark.netlab, pytest.mark.slow]

TIMEOUT = 400.0
JOINER_DOWN_MBIT = 3.0


def wait_until(what: str, done: Any, daemons: list[DaemonProcess]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.5)
    logs = "\n\n".join(d.logs()[-5000:] for d in daemons)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.mark.timeout(900)
def test_a_joiner_whose_download_outlasts_several_rounds_joins(
    tiny_sd1: Path, images: Path, netlab: NetLab, tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    # The codec decides what each round costs the joiner against the state: in int8 a kept
    # round is an eighth of what a local-steps joiner downloads, so a download of k of the
    # pair's intervals leaves rounds that take k/8 of an interval each to fetch, and replaying
    # them outlasts the target below from about 3.4 intervals on (docs/worker.md "Limits"),
    # which the pair's pace here (5-15 s a round) can make of an 18 s download. int4, the
    # codec benchmarks/swarm_utilization.py runs local steps with, halves what a round costs.
    config = tiny_run(tiny_sd1, training={"max_steps": 100_000, "batch_size": 2},
                      sync={"local_steps": 8},
                      checkpoint={"every_steps": 8, "keep_last": 2},
                      averaging={"codec": "int4", "gather_window": 5.0})
    run_config = tmp_path / "run.toml"
    run_config.write_text(config.to_toml())

    def start(name: str, host: Any, bootstrap: str | None) -> DaemonProcess:
        data_dir = tmp_path / name
        data_dir.mkdir()
        shutil.copytree(images, data_dir / "training-data")
        args = ["--no-webui", "--listen", f"/ip4/{host.ip}/tcp/4001", "--reachability",
                "public", "--run-config", str(run_config)]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        daemon = start_daemon("daemon", args, data_dir, launcher=host)
        daemons.append(daemon)
        return daemon

    host_a, host_b = netlab.add_public_host("a"), netlab.add_public_host("b")
    host_c = netlab.add_public_host("c", down_mbit=JOINER_DOWN_MBIT)
    a = start("a", host_a, None)
    boot = f"/ip4/{host_a.ip}/tcp/4001/p2p/{a.peer_id}"
    b = start("b", host_b, boot)
    wait_until("the pair to average two rounds",
               lambda: sum(e["members"] == 2 for e in sync_log(a)) >= 2, [a, b])
    started = time.monotonic()
    c = start("c", host_c, boot)

    def joined_rounds() -> list[dict[str, Any]]:
        return [e for e in sync_log(c) if e["averaged"] and e["members"] == 3
                and e["seconds"] > 0]

    wait_until("two rounds of the joiner trained with the pair",
               lambda: len(joined_rounds()) >= 2, [a, b, c])
    took = time.monotonic() - started

    log = c.logs()
    downloaded = re.search(r"downloaded the state at step (\d+)", log)
    began, arrived, joined = (logged_at(log, pattern) for pattern in (
        "downloading the state of step", "downloaded the state at step",
        "joined the swarm at round"))
    held = held_swarm_weights_at(log)
    intervals = [e["global_step"] for e in sync_log(a)]
    applied = re.search(r"joined the swarm at round (\d+) \((\d+) rounds replayed", log)
    pair = [{e["round"]: e for e in sync_log(d)} for d in (a, b)]
    mine = {e["round"]: e for e in sync_log(c)}
    figures = {"joiner_down_mbit": JOINER_DOWN_MBIT, "seconds_to_two_rounds": round(took, 1),
               "downloaded_step": downloaded and int(downloaded.group(1)),
               "joined_at_round": applied and int(applied.group(1)),
               "rounds_replayed": applied and int(applied.group(2)),
               "download_seconds": round(arrived - began, 1) if began and arrived else None,
               "download_start_to_held_seconds": (round(held - began, 1) if began and held
                                                  else None),
               "download_start_to_joined_seconds": (round(joined - began, 1) if began and joined
                                                    else None),
               "pair_sync_interval_seconds": sync_interval(a),
               "pair_rounds": len(intervals)}
    interval = sync_interval(a)
    target = None
    if began and arrived and interval:
        # The target: the swarm's weights within the download x 1.2 + two sync intervals.
        target = figures["target_seconds"] = round(1.2 * (arrived - began) + 2 * interval, 1)
    print("joiner figures:", figures)
    assert downloaded is not None and applied is not None, log[-6000:]
    # Only the swarm's state crossed the capped link, not the writer's own optimizer.
    assert re.search(r"leaving out .*optimizer\.pt", log), log[-6000:]
    # How many rounds the download outlasts depends on how fast the pair trains here; one is
    # what a joiner could never survive before.
    assert int(applied.group(2)) >= 1, f"the download outlasted no round: {figures}"
    shared = [r for r in mine if r in pair[0] and r in pair[1] and "digest" in mine[r]]
    assert len(shared) >= 3, figures
    for r in shared:
        assert pair[0][r]["digest"] == pair[1][r]["digest"] == mine[r]["digest"], r
    # Holding the swarm's weights is the target's measure: from the round before the one it
    # joined at, when it applied that one before forming the next with the pair (the digests
    # above say the weights were the same), else from the round it joined at.
    assert began is not None and held is not None and target is not None, figures
    assert held - began <= target, figures
