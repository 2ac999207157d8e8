"""A peer that stalls past a round (its worker frozen with SIGSTOP while the other two
average without it) is left behind. Every peer keeps the rounds it applied, so it fetches
the round it missed and those since, applies them to the global weights it held, and is
back in the swarm's rounds with the same weights as the others: no checkpoint written, none
waited for (the run writes none while the test watches)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess
from tests.sync.test_swarm_training import by_round, start_peers, wait_for
from tests.worker.runconfigs import tiny_run
from tests.worker_logs import sync_log

H = 24
"""Rounds of about a second: a peer that fetches and applies a round in a fraction of one
meets the others at their next round. (With rounds as short as a fetch, the peer's first
round can still split the others' group: docs/worker.md, Limits.)"""
GATHER_WINDOW = 8.0
"""Long enough for the third peer, slower to start, to be in the first round."""
FROZEN = 2.5 * GATHER_WINDOW
KEEP_ROUNDS = 64
"""The others keep every round they run during the freeze."""
READY = 120.0


def three_member_rounds(daemon: DaemonProcess) -> list[int]:
    return [e["round"] for e in sync_log(daemon)
            if e["averaged"] and e["members"] == 3 and e["fraction_averaged"] == 1.0]


@pytest.mark.timeout(600)  # about a minute on two idle cores, several on a loaded machine
@pytest.mark.parametrize("overlap", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["overlap", "blocking"])
def test_a_peer_left_behind_replays_the_rounds_it_missed_and_rejoins(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess],
    overlap: bool
) -> None:
    # A run far longer than the test, which stops it, with no checkpoint before its end: a
    # peer left behind can only come back by the rounds the others keep.
    config = tiny_run(tiny_sd1, training={"max_steps": 3000, "batch_size": 2},
                      sync={"local_steps": H, "overlap": overlap},
                      checkpoint={"every_steps": 3000, "keep_last": 2,
                                  "keep_rounds": KEEP_ROUNDS},
                      averaging={"gather_window": GATHER_WINDOW})
    a, b, c = start_peers(tmp_path, config, images, 3, daemons, ready_timeout=READY)
    wait_for([c], lambda s: len(three_member_rounds(c)) >= 2, "two rounds of all three")

    worker = c.call("training.status")["pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        time.sleep(FROZEN)
    finally:
        os.kill(worker, signal.SIGCONT)

    def back_with_the_others(_: list[dict[str, Any]]) -> bool:
        left = [e["round"] for e in sync_log(c) if e.get("left_behind")]
        return bool(left) and any(r > left[0] + 1 for r in three_member_rounds(c))

    wait_for([c], back_with_the_others, "the frozen peer to average with the others again")
    for daemon in (a, b, c):
        daemon.call("training.stop")
    wait_for([a, b, c], lambda s: all(x["state"] == "stopped" for x in s), "the stop")

    log = c.logs()
    left_in = min(e["round"] for e in sync_log(c) if e.get("left_behind"))
    assert f"left behind in round {left_in}: replayed" in log, log[-6000:]
    # The join that followed counts those rounds among the ones replayed since step 0.
    rejoined = re.search(rf"left behind in round {left_in}: replayed (\d+) rounds.*?"
                         r"joined the swarm at round \d+ \((\d+) rounds replayed since the "
                         r"state of step 0 loaded", log, re.DOTALL)
    assert rejoined is not None, log[-6000:]
    assert int(rejoined.group(2)) >= int(rejoined.group(1)) > 0, rejoined.group(0)
    assert "waiting up to" not in log and "training on alone" not in log, log[-6000:]
    # Its worker was frozen, not restarted; the state it came back with is the rounds'.
    assert c.call("training.status")["crashes"] == 0
    assert "downloaded the state" not in log
    # Nor did it write a checkpoint on rejoining: the only one is its stop's.
    saved = sorted((tmp_path / "peer2" / "worker" / "tiny" / "checkpoints").glob("step-*"))
    assert len(saved) <= 1, saved

    work = [d.data_dir / "worker" / "tiny" for d in (a, b, c)]
    rounds = [by_round(w) for w in work]
    # The two that went on averaged the round c missed, and every round they share agrees.
    assert rounds[0][left_in]["members"] == 2 and rounds[0][left_in]["averaged"]
    for r in sorted(set(rounds[0]) & set(rounds[1])):
        assert rounds[0][r]["digest"] == rounds[1][r]["digest"], f"round {r} differs"
    # After its replay c holds the others' global weights, round for round.
    after = [r for r in three_member_rounds(c) if r > left_in]
    assert after, rounds[2]
    for r in after:
        assert rounds[2][r]["digest"] == rounds[0][r]["digest"], f"c's round {r} differs"
