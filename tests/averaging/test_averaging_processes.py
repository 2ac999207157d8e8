"""Averaging across separate peer processes, with peers killed, stopped or cheating."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.averaging_cluster import Cluster, Peer, start_cluster
from benchmarks.averaging_peer import peer_vector

SIZE = 6_000_000
CHUNK_TIMEOUT = 3.0
MID_ROUND = 1 << 20
# The peers start their rounds together on loopback: half a second gathers every announcement.
GATHER = ["--gather", "0.5", "--settle", "0.3"]
COMMON = ["--chunk-timeout", str(CHUNK_TIMEOUT), *GATHER,
          "--chunk-elements", "262144", "--mark-mid-round", str(MID_ROUND)]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def clusters() -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for c in made:
        c.stop()


def report_of(peer: Peer, round_: int = 1) -> dict[str, Any]:
    (entry,) = [r for r in peer.results() if r["round"] == round_]
    assert "report" in entry, entry
    report: dict[str, Any] = entry["report"]
    return report


def wait_until_mid_round(peer: Peer, timeout: float = 30.0) -> None:
    """Until ``peer`` has received chunks of round 1 (it logs ``mid-round 1`` after
    MID_ROUND bytes, started with ``--mark-mid-round``), polled every millisecond: well
    inside the time a round of SIZE takes, whatever the machine's speed."""
    deadline = time.monotonic() + timeout
    while "mid-round 1" not in peer.log.read_text():
        assert time.monotonic() < deadline, peer.log.read_text()[-2000:]
        time.sleep(0.001)


def check_survivors(cluster: Cluster, survivors: list[Peer], round_: int = 1) -> None:
    """Each survivor holds, chunk by chunk, what its report says: the weighted mean of the
    contributors the reducer named, or its own input. On every span whose reducer survived,
    all survivors hold the same values (a reducer cut off mid-way may have reached some
    survivors and not others, and their reports say so)."""
    inputs = {p.peer_id: peer_vector(p.seed, round_, SIZE) for p in cluster.peers}
    weights = {p.peer_id: p.weight for p in cluster.peers}
    buffers = {p.peer_id: np.load(f"{p.out}.round{round_}.npy") for p in survivors}
    reports = {p.peer_id: report_of(p, round_) for p in survivors}
    live = {p.peer_id for p in survivors}
    for peer in survivors:
        report = reports[peer.peer_id]
        members = report["members"]
        for span in report["spans"]:
            for chunk in span["chunks"]:
                lo, hi = chunk["start"], chunk["end"]
                mine = buffers[peer.peer_id][lo:hi]
                if chunk["status"] in ("averaged", "solo"):
                    names = [members[i] for i in chunk["contributors"]]
                    total = sum(weights[n] for n in names)
                    expected = sum(weights[n] * inputs[n][lo:hi].astype(np.float64)
                                   for n in names) / total
                    np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-5)
                    if span["reducer"] in live:
                        for other in survivors:
                            np.testing.assert_array_equal(buffers[other.peer_id][lo:hi], mine)
                else:
                    np.testing.assert_array_equal(mine, inputs[peer.peer_id][lo:hi])


def test_kill_9_of_one_peer_mid_round(workdir: Path, clusters: list[Cluster]) -> None:
    cluster = start_cluster(4, workdir, size=SIZE, rounds=1, weights=[1, 2, 3, 4],
                            extra=[*COMMON, "--save"])
    clusters.append(cluster)
    victim, survivors = cluster.peers[3], cluster.peers[:3]
    cluster.go()
    wait_until_mid_round(victim)
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.wait(CHUNK_TIMEOUT * 2 + 10, survivors)
    for peer in survivors:
        entry = next(r for r in peer.results() if r["round"] == 1)
        report = entry["report"]
        assert victim.peer_id in report["members"], "the victim was killed before the round"
        assert report["complete"] is False
        assert 0 < report["fraction_averaged"] < 1
        assert victim.peer_id in {e["peer"] for e in report["excluded"]}
        averaged = sum(
            c["end"] - c["start"] for s in report["spans"] for c in s["chunks"]
            if c["status"] == "averaged"
        )
        assert report["fraction_averaged"] == pytest.approx(averaged / SIZE)
        # Finished within the chunk timeout (+2 s) of the kill, measured by its own clock.
        assert entry["seconds"] < 1.3 + (time.monotonic() - killed_at) + 1  # sanity
    finish_after_kill = max(p.out.stat().st_mtime for p in survivors) - (
        time.time() - (time.monotonic() - killed_at)
    )
    assert finish_after_kill <= CHUNK_TIMEOUT + 2.0
    check_survivors(cluster, survivors)


# 16 s; a member that holds its channels and sends nothing is cut off at the chunk timeout by
# default in tests/averaging/test_hostile_groups.py.
@pytest.mark.slow
def test_sigstop_of_one_peer_is_cut_off_by_the_timeout(
    workdir: Path, clusters: list[Cluster]
) -> None:
    cluster = start_cluster(4, workdir, size=SIZE, rounds=1, extra=[*COMMON, "--save"])
    clusters.append(cluster)
    stopped, others = cluster.peers[1], [cluster.peers[i] for i in (0, 2, 3)]
    cluster.go()
    wait_until_mid_round(stopped)
    stopped.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    cluster.wait(CHUNK_TIMEOUT * 3 + 10, others)
    assert time.monotonic() - stopped_at <= CHUNK_TIMEOUT * 2 + 4.0
    for peer in others:
        assert peer.proc.returncode == 0, peer.log.read_text()[-2000:]
        report = report_of(peer)
        assert report["complete"] is False
        assert stopped.peer_id in {e["peer"] for e in report["excluded"]}
    check_survivors(cluster, others)
    stopped.signal(signal.SIGCONT)


# Each attack takes about 10 s of real processes; the scaled one (the attack the clipping is
# for) runs by default, the others with the slow suite.
@pytest.mark.parametrize("attack", [
    "scale", pytest.param("nan", marks=pytest.mark.slow),
    pytest.param("noise", marks=pytest.mark.slow)])
def test_byzantine_peer_is_clipped_scored_and_excluded(
    workdir: Path, clusters: list[Cluster], attack: str
) -> None:
    rounds = 3
    cluster = start_cluster(
        4, workdir, size=400_000, rounds=rounds,
        extra=["--mode", "centered_clip", "--chunk-timeout", "3", *GATHER,
               "--chunk-elements", "16384", "--save", "--pause", "0.5"],
        per_peer={3: ["--byzantine", attack]},
    )
    clusters.append(cluster)
    honest, cheat = cluster.peers[:3], cluster.peers[3]
    cluster.go()
    cluster.wait(120)
    size = 400_000
    first = {p.peer_id: np.load(f"{p.out}.round1.npy") for p in honest}
    honest_mean = np.mean([peer_vector(p.seed, 1, size) for p in honest], axis=0)
    for buf in first.values():
        rel = np.linalg.norm(buf - honest_mean) / np.linalg.norm(honest_mean)
        assert rel < 0.05, rel
    last = [report_of(p, rounds) for p in honest]
    for report in last:
        assert cheat.peer_id not in report["members"], "the cheat was still grouped"
    scores = {s["peer"]: s for s in honest[0].results()[-1]["scores"]}
    assert scores[cheat.peer_id]["score"] < 0
    assert scores[cheat.peer_id]["banned_until"] is not None
