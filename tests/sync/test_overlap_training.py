"""Three daemons and their workers train one run with ``sync.overlap`` over loopback: every
round is applied one boundary late with the same digest of the global weights on every peer,
the workers train while their rounds are averaged, and when one peer is killed (kill -9 of
its daemon) the other two go on together, still bit-identical. A peer that comes mid-run
downloads the swarm's state and joins it with the same global weights."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess
from tests.sync.test_swarm_training import (
    TIMEOUT,
    by_round,
    read_jsonl,
    start_peer,
    start_peers,
    wait_for,
)
from tests.worker.runconfigs import tiny_run
from tests.worker_logs import replayed_rounds, sync_log

H = 3
CHECKPOINT_ROUNDS = 3
READY = 120.0
"""Seconds a daemon may take to start on a loaded machine."""


def steps_during(round_: dict[str, Any], train_log: list[dict[str, Any]]) -> int:
    """Train steps this worker finished while the round was being averaged."""
    return sum(1 for e in train_log if round_["launched"] < e["time"] < round_["finished"])


def kill_when_grouped(daemon: DaemonProcess) -> int:
    """SIGKILL ``daemon`` once its log shows it grouped with three for a round that is not a
    checkpoint's; returns that round."""
    deadline = time.monotonic() + TIMEOUT
    grouped = re.compile(r"round (\d+): 3 announcements, 1 groups, mine has 3 members")
    while time.monotonic() < deadline:
        rounds = [int(r) for r in grouped.findall(daemon.stderr_path.read_text())]
        if rounds and rounds[-1] % CHECKPOINT_ROUNDS != 0 and rounds[-1] > 2:
            daemon.proc.kill()
            daemon.proc.wait()
            return rounds[-1]
        time.sleep(0.01)
    raise AssertionError(f"no round to kill in:\n{daemon.logs()[-5000:]}")


def averaged_rounds(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The rounds the daemon's worker averaged in full with at least one other peer."""
    return [e for e in sync_log(daemon) if e["averaged"] and e["fraction_averaged"] == 1.0]


def three_member_rounds(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in sync_log(daemon) if e["averaged"] and e["members"] == 3]


@pytest.mark.timeout(600)  # about a minute on two idle cores, several on a loaded machine
def test_overlapping_peers_stay_identical_and_survive_a_killed_peer(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # A run far longer than the test, which stops it. Rounds gather the last round's peers for
    # up to ten seconds, while the peers train: about the time of H steps here, which keeps
    # a slower peer in every round. The third peer, slower to start, may come late to the
    # first rounds: it then catches up and joins as a late peer does.
    config = tiny_run(tiny_sd1, training={"max_steps": 3000, "batch_size": 2},
                      sync={"local_steps": H, "overlap": True},
                      checkpoint={"every_steps": CHECKPOINT_ROUNDS * H, "keep_last": 2},
                      averaging={"gather_window": 10.0})
    a, b, c = start_peers(tmp_path, config, images, 3, daemons, ready_timeout=READY)
    wait_for([c], lambda s: len(three_member_rounds(c)) >= 2, "two rounds of all three")

    # Kill c's daemon as soon as it has formed a group of three for a round that no
    # checkpoint waits for: while the round is being averaged, or just after.
    worker_pid = c.call("training.status")["pid"]
    killed_round = kill_when_grouped(c)
    killed_at = time.time()
    try:
        def two_after_kill(states: list[dict[str, Any]]) -> bool:
            return all(sum(1 for e in read_jsonl(d.data_dir / "worker/tiny/sync_log.jsonl")
                           if e.get("launched", 0) > killed_at and e["members"] == 2
                           and e["fraction_averaged"] == 1.0) >= 3 for d in (a, b))

        wait_for([a, b], two_after_kill, "three rounds of the two survivors")
    finally:
        # c's worker exits once it finds its daemon gone; a slow one is not left behind.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)
    for daemon in (a, b):
        daemon.call("training.stop")
    wait_for([a, b], lambda s: all(x["state"] == "stopped" for x in s), "the stop")

    work = [d.data_dir / "worker" / "tiny" for d in (a, b, c)]
    rounds = [by_round(w) for w in work]
    shared = sorted(set(rounds[0]) & set(rounds[1]))
    assert len(shared) >= 6, (rounds[0].keys(), rounds[1].keys())
    for r in shared:
        assert rounds[0][r]["digest"] == rounds[1][r]["digest"], f"round {r} differs"
    with_c = {e["round"] for e in three_member_rounds(c)}
    assert len(with_c) >= 2
    # The survivors got past the round c died in (applied or not, the same on both).
    assert killed_round in rounds[0] and killed_round in rounds[1]
    for r in with_c:
        assert rounds[2][r]["digest"] == rounds[0][r]["digest"], f"c's round {r} differs"

    for w, by in zip(work[:2], rounds[:2], strict=True):
        train_log = read_jsonl(w / "train_log.jsonl")
        mine = [e for e in by.values() if "launched" in e]
        # Applied once back (averaged in full: between the boundaries), or at the next
        # boundary at the latest.
        overlapped = [e for e in mine
                      if e["round"] * H < e["global_step"] <= (e["round"] + 1) * H]
        assert len(overlapped) >= 3, "rounds applied after steps trained"
        for e in overlapped:
            # The worker waited only for what was left of the round after H steps.
            assert e["waited"] < e["seconds"], e
        assert sum(steps_during(e, train_log) for e in overlapped) > 0
        for e in mine:
            if e["round"] % CHECKPOINT_ROUNDS == 0:
                assert e["global_step"] == e["round"] * H, "a checkpoint waits for its round"


@pytest.mark.timeout(600)  # about a minute on two idle cores, several on a loaded machine
# Streaming fragments are opt-in: their joiner runs with the slow suite.
@pytest.mark.parametrize("fragments", [1, pytest.param(2, marks=pytest.mark.slow)],
                         ids=["whole", "streaming"])
def test_a_third_peer_joins_an_overlapping_swarm_mid_run(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess],
    fragments: int
) -> None:
    # A newcomer's first round has no peers to expect and gathers for the whole window, so
    # it meets the others' round only when that window is short: this test keeps the half
    # second the blocking mode's joining test has. Streaming: two fragments of H = 4 steps,
    # a round (of one fragment) every 2 steps; the newcomer replays rounds of both
    # fragments, and applies each to its own fragment.
    local_steps = H if fragments == 1 else 2 * fragments
    interval = local_steps // fragments
    config = tiny_run(tiny_sd1, training={"max_steps": 3000, "batch_size": 2},
                      sync={"local_steps": local_steps, "overlap": True,
                            "fragments": fragments},
                      checkpoint={"every_steps": CHECKPOINT_ROUNDS * interval, "keep_last": 2},
                      averaging={"gather_window": 0.5})
    a, b = start_peers(tmp_path, config, images, 2, daemons, ready_timeout=READY)
    wait_for([a], lambda s: s[0]["global_step"] >= 2 * CHECKPOINT_ROUNDS * interval,
             "the pair to pass its second checkpoint")

    c = start_peer(tmp_path, 2, images, daemons, ready_timeout=READY)
    # The rounds c replays are logged as it applies them: only rounds it trained and
    # launched show it in.
    wait_for([c], lambda s: len([e for e in averaged_rounds(c) if "launched" in e]) >= 2,
             "two rounds that c trained, averaged in full")
    for daemon in (a, b, c):
        daemon.call("training.stop")
    wait_for([a, b, c], lambda s: all(x["state"] == "stopped" for x in s), "the stop")
    assert "downloaded the state at step" in c.logs(), c.logs()[-5000:]
    # Only the swarm's state crossed the wire, not the writer's own optimizer and generators.
    assert re.search(r"leaving out .*optimizer\.pt", c.logs()), c.logs()[-5000:]
    # The state offered is the pair's last checkpoint, up to CHECKPOINT_ROUNDS - 1 rounds
    # behind: the rounds since are fetched and replayed (how many depends on timing).
    print("rounds replayed:", replayed_rounds(c.logs(), interval))

    # Every round two peers both averaged in full left them with the same global weights. (On
    # a loaded machine a round of three can end partial, which no peer applies, or leave one
    # peer behind, which catches up: those rounds say nothing about the weights.)
    logs = [{e["round"]: e for e in averaged_rounds(d)} for d in (a, b, c)]
    assert min(logs[2]) > 2 * CHECKPOINT_ROUNDS, "the newcomer joined after the pair trained"
    with_c = 0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        for r in logs[i].keys() & logs[j].keys():
            assert logs[i][r]["digest"] == logs[j][r]["digest"], (i, j, r)
            with_c += j == 2
    assert with_c >= 3
    if fragments > 1:
        # Each round synced one fragment, in turn, and the fragments cover the vector.
        spans = {tuple(e["span"]) for e in logs[0].values() if "span" in e}
        assert len(spans) == fragments, spans
        ordered = sorted(spans)
        assert ordered[0][0] == 0 and all(x[1] == y[0] for x, y in itertools.pairwise(ordered))
        for e in logs[0].values():
            if "span" in e:
                assert tuple(e["span"]) == ordered[e["round"] % fragments], e
