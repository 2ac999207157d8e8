"""Reading when things happened from a daemon's log (its worker's lines included)."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from tests.daemon_proc import DaemonProcess


def sync_log(daemon: DaemonProcess, run: str = "tiny") -> list[dict[str, Any]]:
    """The rounds of ``daemon``'s worker, as its ``sync_log.jsonl`` has them so far."""
    path = daemon.data_dir / "worker" / run / "sync_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


STAMP = re.compile(r"(\d\d):(\d\d):(\d\d,\d+)")


def _seconds(line: str) -> float | None:
    # The daemon prefixes its worker's lines with its own stamp: the worker's is the last.
    m = STAMP.search(line.split("dandelion_p2p.worker.process")[-1])
    if m is None:
        return None
    h, mi, sec = m.groups()
    return int(h) * 3600 + int(mi) * 60 + float(sec.replace(",", "."))


def logged_at(log: str, pattern: str) -> float | None:
    """When the first log line holding ``pattern`` was written (seconds of the day)."""
    for line in log.splitlines():
        if pattern in line and (at := _seconds(line)) is not None:
            return at
    return None


APPLIED = re.compile(r"worker\.train: round (\d+): averaged, \d+ members, 100% averaged")
JOINED = re.compile(r"joined the swarm at round (\d+)")


def applied_at(log: str) -> dict[int, float]:
    """When each round the worker applied with others (averaged in full, or replayed from
    the rounds peers keep) was applied, by round: the first time, seconds of the day."""
    out: dict[int, float] = {}
    for line in log.splitlines():
        if (m := APPLIED.search(line)) and (at := _seconds(line)) is not None:
            out.setdefault(int(m.group(1)), at)
    return out


def held_swarm_weights_at(log: str) -> float | None:
    """When the joiner whose ``log`` this is came to hold the swarm's weights for good: it
    joined at round J, and held the others' weights from the moment it applied round J - 1,
    when that was before it formed round J with them (they apply round J only once it is
    averaged, with the joiner among them); otherwise (it applied J - 1 together with J, having
    fetched it while taking part) from the moment it applied round J. None before it joined."""
    joined = JOINED.search(log)
    if joined is None:
        return None
    round_ = int(joined.group(1))
    applied = applied_at(log[:joined.end()])
    formed = [at for line in log[:joined.start()].splitlines()
              if re.search(rf"matchmaking: round {round_}: .* mine has ([2-9]|\d\d+) members",
                           line) and (at := _seconds(line)) is not None]
    before = applied.get(round_ - 1)
    if before is not None and formed and before <= formed[-1]:
        return before
    return applied.get(round_)


def sync_interval(daemon: DaemonProcess) -> float | None:
    """Median seconds between two of ``daemon``'s rounds, from its log's round lines."""
    times = [at for line in daemon.logs().splitlines()
             if "worker.train: round " in line and (at := _seconds(line)) is not None]
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return round(gaps[len(gaps) // 2], 1) if gaps else None


def replayed_rounds(log: str, interval: int) -> int:
    """How many kept rounds the joiner whose ``log`` this is applied onto the last state it
    downloaded before it joined. Every round between that state and the one it joined at
    must have been applied in between; on a straight join (no try given up, never left
    behind) all of them were replayed."""
    joined = re.search(r"joined the swarm at round (\d+) \((\d+) rounds replayed since the "
                       r"state of step (\d+) loaded", log)
    assert joined is not None, log[-5000:]
    before = log[:joined.start()]
    downloads = list(re.finditer(r"downloaded the state at step (\d+)", before))
    assert downloads, before[-5000:]
    round_, replayed, loaded = (int(g) for g in joined.groups())
    story = joining_story(log[:joined.end()])
    assert loaded == int(downloads[-1].group(1)), story
    since = range(loaded // interval + 1, round_)
    between = before[downloads[-1].end():]
    applied = {int(r) for r in re.findall(r"worker\.train: round (\d+): averaged", between)}
    assert set(since) <= applied, (sorted(set(since) - applied), story)
    straight = not re.search(r"could not join|left behind", between)
    if straight:
        assert replayed == len(since), (round_, replayed, loaded, story)
    else:
        assert 0 < replayed <= len(since) or not since, (round_, replayed, loaded, story)
    return replayed


def joining_story(log: str) -> list[str]:
    """The lines of ``log`` that tell how a joiner came in: downloads, joins, tries that
    ended without a join, rounds it was left behind in."""
    return [line for line in log.splitlines() if re.search(
        r"downloaded the state|joined the swarm|could not join|left behind|do not follow on",
        line)]
