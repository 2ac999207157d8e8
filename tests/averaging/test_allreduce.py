"""All-reduce rounds between several in-memory peers: correctness, codecs, memory.

``Net`` routes the ``Send`` frames of several ``AllReducePeer`` machines with a latency and an
optional per-link bandwidth, and can kill or stall peers and tamper with frames, all on a
simulated clock. The fault and adversarial tests (test_allreduce_faults.py) reuse it.
"""

from __future__ import annotations

import gc
import heapq
import json
import math
import random
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from dandelion_p2p.averaging.allreduce import AllReducePeer, Send
from dandelion_p2p.averaging.compression import BufferErrorFeedback, get_codec
from dandelion_p2p.averaging.group import GroupSpec, Member
from dandelion_p2p.averaging.report import ChunkStatus, RoundReport
from dandelion_p2p.identity import Identity
from dandelion_p2p.reputation.book import ScoreEvent

RUN = b"run-test"
IDENTITIES = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(10)]
BY_ID = {ident.peer_id_bytes: ident for ident in IDENTITIES}


def identities(n: int) -> list[Identity]:
    """``n`` identities in peer id order."""
    return sorted(IDENTITIES[:n], key=lambda i: i.peer_id_bytes)


def make_spec(
    idents: Sequence[Identity],
    weights: Sequence[float],
    *,
    bandwidths: Sequence[float] | None = None,
    accepts: Sequence[bool] | None = None,
    round_: int = 1,
) -> GroupSpec:
    n = len(idents)
    bandwidths = bandwidths if bandwidths is not None else [100.0] * n
    accepts = accepts if accepts is not None else [True] * n
    members = [
        Member(i.peer_id_bytes, w, b, a)
        for i, w, b, a in zip(idents, weights, bandwidths, accepts, strict=True)
    ]
    return GroupSpec.of(RUN, round_, members)


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    src: bytes = field(compare=False)
    dst: bytes = field(compare=False)
    frame: bytes = field(compare=False, default=b"")


Tamper = Callable[[bytes, Send, bytes], bytes | None]


class Net:
    """A simulated network between peers: frames arrive after ``latency`` plus their size
    over ``bandwidth`` (bytes/s, frames on one link queue behind each other)."""

    def __init__(
        self,
        peers: dict[bytes, AllReducePeer],
        *,
        latency: float = 0.01,
        bandwidth: float | None = None,
        tick_every: float = 0.5,
    ) -> None:
        self.peers = peers
        self.latency = latency
        self.bandwidth = bandwidth
        self.tick_every = tick_every
        self.now = 0.0
        self.queue: list[_Event] = []
        self.seq = 0
        self.dead: set[bytes] = set()
        self.stalled: set[bytes] = set()
        self.tamper: Tamper | None = None
        self.link_free: dict[tuple[bytes, bytes], float] = {}
        self.delivered: list[tuple[float, bytes, bytes, bytes]] = []
        self.record = False

    def live(self) -> list[bytes]:
        return [p for p in self.peers if p not in self.dead and p not in self.stalled]

    def post(self, src: bytes, sends: list[Send]) -> None:
        if src in self.dead or src in self.stalled:
            return
        for send in sends:
            frame = send.frame()
            if self.tamper is not None:
                tampered = self.tamper(src, send, frame)
                if tampered is None:
                    continue
                frame = tampered
            at = self.now + self.latency
            if self.bandwidth:
                link = (src, send.recipient)
                at = max(at, self.link_free.get(link, 0.0)) + len(frame) / self.bandwidth
                self.link_free[link] = at
            self._push(at, "frame", src, send.recipient, frame)

    def _push(self, at: float, kind: str, src: bytes, dst: bytes, frame: bytes = b"") -> None:
        self.seq += 1
        heapq.heappush(self.queue, _Event(at, self.seq, kind, src, dst, frame))

    def start(self) -> None:
        for pid, peer in self.peers.items():
            self.post(pid, peer.start(self.now))

    def kill_at(self, at: float, peer: bytes, notify_after: float | None = 0.2) -> None:
        """Kill ``peer`` at ``at``; the others' transports notice ``notify_after`` later
        (never, with None)."""
        self._push(at, "kill", peer, peer)
        if notify_after is not None:
            for other in self.peers:
                if other != peer:
                    self._push(at + notify_after, "fail", peer, other)

    def stall_at(self, at: float, peer: bytes) -> None:
        self._push(at, "stall", peer, peer)

    def deliver(self, src: bytes, dst: bytes, frame: bytes) -> list[Send]:
        sends = self.peers[dst].on_frame(src, frame, self.now)
        self.post(dst, sends)
        return sends

    def run(self, max_time: float = 600.0) -> None:
        next_tick = self.now + self.tick_every
        while not all(self.peers[p].done for p in self.live()):
            if self.queue and self.queue[0].at <= next_tick:
                ev = heapq.heappop(self.queue)
                self.now = max(self.now, ev.at)
                self._handle(ev)
            else:
                self.now = next_tick
                next_tick += self.tick_every
                for p in self.live():
                    self.post(p, self.peers[p].tick(self.now))
            assert self.now <= max_time, "round did not finish"
        # Drain what is still in flight (late frames must be harmless).
        while self.queue:
            ev = heapq.heappop(self.queue)
            self.now = max(self.now, ev.at)
            self._handle(ev)

    def _handle(self, ev: _Event) -> None:
        if ev.kind == "kill":
            self.dead.add(ev.src)
        elif ev.kind == "stall":
            self.stalled.add(ev.src)
        elif ev.kind == "fail":
            if ev.dst in self.live():
                self.post(ev.dst, self.peers[ev.dst].on_peer_failed(ev.src, self.now, "reset"))
        elif ev.dst in self.live() and ev.src not in self.dead:
            if self.record:
                self.delivered.append((self.now, ev.src, ev.dst, ev.frame))
            self.post(ev.dst, self.peers[ev.dst].on_frame(ev.src, ev.frame, self.now))


@dataclass
class Swarm:
    spec: GroupSpec
    originals: dict[bytes, np.ndarray]
    buffers: dict[bytes, np.ndarray]
    weights: dict[bytes, float]
    peers: dict[bytes, AllReducePeer]
    net: Net

    def reports(self) -> dict[bytes, RoundReport]:
        return {p: self.peers[p].report() for p in self.net.live()}

    def mean_of(self, contributors: Sequence[bytes], sl: slice) -> np.ndarray:
        total = math.fsum(self.weights[p] for p in contributors)
        acc = sum(self.originals[p][sl].astype(np.float64) * self.weights[p] for p in contributors)
        return np.asarray(acc, dtype=np.float64) / total

    def events(self, peer: bytes) -> list[tuple[bytes, ScoreEvent]]:
        return self.peers[peer].score_events


def correlated_vectors(
    rng: np.random.Generator, n_peers: int, size: int, spread: float = 0.3
) -> list[np.ndarray]:
    """What honest peers hold: a shared direction plus each peer's own noise."""
    base = rng.standard_normal(size)
    return [(base + spread * rng.standard_normal(size)).astype(np.float32) for _ in range(n_peers)]


def build(
    n: int,
    *,
    size: int = 5000,
    seed: int = 0,
    codec: str = "none",
    mode: str = "mean",
    max_chunk: int = 1024,
    chunk_timeout: float = 5.0,
    result_timeout: float | None = None,
    accepts: Sequence[bool] | None = None,
    bandwidths: Sequence[float] | None = None,
    vectors: Sequence[np.ndarray] | None = None,
    weights: Sequence[float] | None = None,
    round_: int = 1,
    net_bandwidth: float | None = None,
) -> Swarm:
    rng = np.random.default_rng(seed)
    idents = identities(n)
    if weights is None:
        weights = [float(w) for w in rng.uniform(1.0, 100.0, n)]
    if bandwidths is None:
        bandwidths = [float(b) for b in rng.choice([10.0, 50.0, 100.0, 1000.0], n)]
    spec = make_spec(idents, weights, bandwidths=bandwidths, accepts=accepts, round_=round_)
    if vectors is None:
        vectors = [rng.standard_normal(size).astype(np.float32) + 0.1 for _ in range(n)]
    originals = {i.peer_id_bytes: v.copy() for i, v in zip(idents, vectors, strict=True)}
    buffers = {p: v.copy() for p, v in originals.items()}
    weight_of = {i.peer_id_bytes: w for i, w in zip(idents, weights, strict=True)}
    peers = {
        i.peer_id_bytes: AllReducePeer(
            peer_id=i.peer_id_bytes,
            sign=i.sign,
            spec=spec,
            buffer=buffers[i.peer_id_bytes],
            codec=codec,
            mode=mode,  # type: ignore[arg-type]
            max_chunk=max_chunk,
            chunk_timeout=chunk_timeout,
            result_timeout=result_timeout,
        )
        for i in idents
    }
    net = Net(peers, bandwidth=net_bandwidth)
    return Swarm(spec, originals, buffers, weight_of, peers, net)


def close(got: np.ndarray, expected: np.ndarray, scale: float) -> bool:
    return bool(np.all(np.abs(got - expected) <= 1e-6 * np.abs(expected) + 1e-12 * scale))


def check_consistent(swarm: Swarm, *, exact: bool = True) -> dict[bytes, RoundReport]:
    """Every live peer is done, and its buffer is exactly what its report says: averaged
    chunks hold the weighted mean over the listed contributors, local chunks its own values;
    peers that got the same reducer's result hold identical bits."""
    reports = swarm.reports()
    scale = max(float(np.abs(v).max()) for v in swarm.originals.values())
    n = next(iter(swarm.buffers.values())).size
    for peer, rep in reports.items():
        assert rep.done
        buf = swarm.buffers[peer]
        averaged = 0
        for span in rep.spans:
            for c in span.chunks:
                sl = slice(c.start, c.end)
                if c.status is ChunkStatus.LOCAL:
                    np.testing.assert_array_equal(buf[sl], swarm.originals[peer][sl])
                    continue
                assert c.status in (ChunkStatus.AVERAGED, ChunkStatus.SOLO)
                assert (c.status is ChunkStatus.AVERAGED) == (len(c.contributors) >= 2)
                assert span.reducer in c.contributors
                if exact:
                    assert close(buf[sl], swarm.mean_of(c.contributors, sl), scale)
                if c.status is ChunkStatus.AVERAGED:
                    averaged += c.size
        assert rep.fraction_averaged == averaged / n
    # Two peers that both applied a reducer's result for a chunk hold the same bits there.
    for span_index in range(len(swarm.spec.members)):
        holders: dict[int, list[bytes]] = {}
        for peer, rep in reports.items():
            for c in rep.spans[span_index].chunks:
                if c.status is not ChunkStatus.LOCAL:
                    holders.setdefault(c.index, []).append(peer)
        for index, peers in holders.items():
            c = reports[peers[0]].spans[span_index].chunks[index]
            first = swarm.buffers[peers[0]][c.start : c.end]
            for other in peers[1:]:
                oc = reports[other].spans[span_index].chunks[index]
                assert oc.contributors == c.contributors
                np.testing.assert_array_equal(swarm.buffers[other][c.start : c.end], first)
    return reports


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("n", range(2, 9))
def test_round_averages_exactly_and_everyone_ends_identical(n: int) -> None:
    rng = random.Random(n)
    accepts = [rng.random() < 0.7 for _ in range(n)]
    accepts[rng.randrange(n)] = True
    swarm = build(n, size=rng.randrange(3000, 9000), seed=n, accepts=accepts)
    swarm.net.start()
    swarm.net.run()
    reports = check_consistent(swarm)

    w = np.array([swarm.weights[p] for p in swarm.spec.peer_ids])
    stacked = np.stack([swarm.originals[p].astype(np.float64) for p in swarm.spec.peer_ids])
    expected = (w[:, None] * stacked).sum(axis=0) / w.sum()
    scale = float(np.abs(stacked).max())
    first = swarm.buffers[swarm.spec.peer_ids[0]]
    assert close(first, expected, scale)
    for peer in swarm.spec.peer_ids:
        np.testing.assert_array_equal(swarm.buffers[peer], first)
        rep = reports[peer]
        assert rep.complete and rep.fraction_averaged == 1.0
        assert rep.excluded == () and rep.violations == ()
        assert rep.bytes_sent > 0 and rep.bytes_received > 0
        assert rep.group_id == swarm.spec.group_id
        events = swarm.events(peer)
        assert all(e is ScoreEvent.SUCCESS for _, e in events)
        # Every other member owed this peer something (chunks to its span or results).
        owed = {
            p
            for p in swarm.spec.peer_ids
            if p != peer
            and (
                rep.spans[swarm.spec.index_of(peer)].size or rep.spans[swarm.spec.index_of(p)].size
            )
        }
        assert {p for p, _ in events} == owed
        assert len(events) == len(owed)
    json.dumps(reports[first_peer(swarm)].to_dict())


def first_peer(swarm: Swarm) -> bytes:
    return swarm.spec.peer_ids[0]


def relative_l2(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))


# Documented end-to-end bounds (protocol/averaging.md section 10): a contribution and the
# result are each encoded once, so the error is about twice the codec's own.
CODEC_BOUNDS = {"fp16": 1e-3, "bf16": 8e-3, "int8": 1e-2, "int4": 0.15, "int2": 0.55}


@pytest.mark.parametrize("codec", sorted(CODEC_BOUNDS))
@pytest.mark.parametrize("mode", ["mean", "centered_clip"])
def test_lossy_codecs_stay_within_bounds_and_identical(codec: str, mode: str) -> None:
    n = 6
    rng = np.random.default_rng(42)
    vectors = correlated_vectors(rng, n, 20000)
    # The same round without compression is the reference (for centered clipping it is not
    # the plain mean).
    exact = build(n, mode=mode, vectors=vectors, max_chunk=2048, seed=3)
    exact.net.start()
    exact.net.run()
    reference = exact.buffers[first_peer(exact)].astype(np.float64)
    if mode == "mean":
        assert close(reference, exact.mean_of(exact.spec.peer_ids, slice(None)), 10.0)
    swarm = build(n, codec=codec, mode=mode, vectors=vectors, max_chunk=2048, seed=3)
    swarm.net.start()
    swarm.net.run()
    check_consistent(swarm, exact=False)
    first = swarm.buffers[first_peer(swarm)]
    err = relative_l2(first, reference)
    assert err <= CODEC_BOUNDS[codec], err
    for peer in swarm.spec.peer_ids:
        np.testing.assert_array_equal(swarm.buffers[peer], first)
        assert swarm.peers[peer].report().complete


def test_centered_clip_without_attackers_is_close_to_the_mean() -> None:
    rng = np.random.default_rng(7)
    swarm = build(5, mode="centered_clip", vectors=correlated_vectors(rng, 5, 8000))
    swarm.net.start()
    swarm.net.run()
    honest = swarm.mean_of(swarm.spec.peer_ids, slice(None))
    assert relative_l2(swarm.buffers[first_peer(swarm)], honest) < 0.02
    assert all(r.complete for r in swarm.reports().values())


def test_group_of_one_finishes_alone_and_reports_nothing_averaged() -> None:
    swarm = build(1, size=3000)
    swarm.net.start()
    swarm.net.run()
    (rep,) = swarm.reports().values()
    assert rep.done and not rep.complete and rep.fraction_averaged == 0.0
    assert {c.status for s in rep.spans for c in s.chunks} == {ChunkStatus.SOLO}
    peer = first_peer(swarm)
    np.testing.assert_array_equal(swarm.buffers[peer], swarm.originals[peer])


def test_frames_arriving_before_start_are_used() -> None:
    swarm = build(3, size=4000)
    ids = swarm.spec.peer_ids
    # Peers 1 and 2 start; peer 0 starts only after their chunks reached it.
    for p in ids[1:]:
        swarm.net.post(p, swarm.peers[p].start(0.0))
    for _ in range(len(swarm.net.queue)):
        ev = heapq.heappop(swarm.net.queue)
        if ev.dst == ids[0]:
            swarm.net.post(ids[0], swarm.peers[ids[0]].on_frame(ev.src, ev.frame, 0.05))
        else:
            heapq.heappush(swarm.net.queue, ev)
            break
    swarm.net.now = 0.1
    swarm.net.post(ids[0], swarm.peers[ids[0]].start(0.1))
    swarm.net.run()
    assert all(r.complete for r in check_consistent(swarm).values())


def test_two_rounds_in_a_row_reuse_the_buffers() -> None:
    swarm = build(4, size=4000, seed=9)
    swarm.net.start()
    swarm.net.run()
    after_one = {p: b.copy() for p, b in swarm.buffers.items()}
    spec2 = make_spec(
        identities(4),
        [swarm.weights[p] for p in swarm.spec.peer_ids],
        round_=2,
    )
    assert spec2.group_id != swarm.spec.group_id
    peers2 = {
        p: AllReducePeer(
            peer_id=p, sign=BY_ID[p].sign, spec=spec2, buffer=swarm.buffers[p], max_chunk=1024
        )
        for p in spec2.peer_ids
    }
    net2 = Net(peers2)
    net2.start()
    net2.run()
    for p in spec2.peer_ids:
        # Already equal everywhere, so the mean of equal vectors is the same vector.
        np.testing.assert_allclose(swarm.buffers[p], after_one[p], rtol=1e-6, atol=1e-6)
        assert peers2[p].report().complete


def test_next_deadline_and_in_progress() -> None:
    swarm = build(3, size=3000)
    peer = swarm.peers[first_peer(swarm)]
    assert peer.next_deadline is None
    peer.start(10.0)
    assert peer.next_deadline == pytest.approx(10.0 + 5.0)
    assert peer.in_progress == 0


def test_reducer_memory_is_bounded_by_chunks_in_flight() -> None:
    n = 16 * 1024 * 1024  # 64 MiB of float32
    chunk = 256 * 1024  # 1 MiB of float32
    idents = identities(2)
    spec = make_spec(idents, [1.0, 3.0])
    rng = np.random.default_rng(1)
    bufs = [rng.standard_normal(n, dtype=np.float32) for _ in idents]
    reducer_id, sender_id = idents[0].peer_id_bytes, idents[1].peer_id_bytes
    reducer = AllReducePeer(
        peer_id=reducer_id, sign=idents[0].sign, spec=spec, buffer=bufs[0], max_chunk=chunk
    )
    sender = AllReducePeer(
        peer_id=sender_id, sign=idents[1].sign, spec=spec, buffer=bufs[1], max_chunk=chunk
    )
    span = reducer.partition.span_of(reducer_id)
    assert span.size * 4 >= 24 * 1024 * 1024
    expected = (
        bufs[0][span.start : span.end].astype(np.float64) * 1.0
        + bufs[1][span.start : span.end].astype(np.float64) * 3.0
    ) / 4.0
    sends = sender.start(0.0)  # chunk frames render lazily: nothing encoded yet
    to_reducer = [s for s in sends if s.recipient == reducer_id]
    del sends
    gc.collect()
    tracemalloc.start()
    try:
        own = reducer.start(0.0)
        del own
        results = 0
        while to_reducer:
            send = to_reducer.pop(0)
            frame = send.frame()
            del send
            out = reducer.on_frame(sender_id, frame, 1.0)
            del frame
            for s in out:
                assert s.kind == "result"
                s.buffers()  # rendered and dropped, as a transport would after writing
                results += 1
            del out
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert results == len(reducer.partition.chunks(reducer_id, chunk))
    # One chunk in flight, 1 MiB as float32: the frame while it is built (payload and joined
    # copy), its decoded values, the float64 sum (2 MiB), then the result's payload. About
    # five chunks' worth, against the 32 MiB span and the 64 MiB vector.
    assert peak < 7 * 1024 * 1024, peak
    got = bufs[0][span.start : span.end]
    assert np.max(np.abs(got - expected)) <= 1e-6 * np.max(np.abs(expected))


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
def test_error_feedback_keeps_the_running_sum_of_compressed_rounds_unbiased(codec: str) -> None:
    """The same compressed gradient averaged round after round: without error feedback
    every round drops the same part, so the running sum drifts by one round's error per
    round; with it, what was dropped is sent in later rounds."""
    idents = identities(3)
    weights = [1.0, 2.0, 3.0]
    size, rounds = 4000, 16
    rng = np.random.default_rng(21)
    grads = [rng.standard_normal(size).astype(np.float32) for _ in idents]
    true_mean = sum(w * g.astype(np.float64) for w, g in zip(weights, grads, strict=True)) / 6.0
    errors = {}
    for with_feedback in (False, True):
        feedback = {
            i.peer_id_bytes: (
                BufferErrorFeedback(get_codec(codec), size) if with_feedback else None
            )
            for i in idents
        }
        total = np.zeros(size)
        for round_ in range(1, rounds + 1):
            spec = make_spec(idents, weights, round_=round_)
            buffers = {i.peer_id_bytes: g.copy() for i, g in zip(idents, grads, strict=True)}
            peers = {
                p: AllReducePeer(
                    peer_id=p, sign=BY_ID[p].sign, spec=spec, buffer=buffers[p], codec=codec,
                    max_chunk=1024, error_feedback=feedback[p],
                )
                for p in spec.peer_ids
            }
            net = Net(peers)
            net.start()
            net.run()
            total += buffers[spec.peer_ids[0]]
        errors[with_feedback] = relative_l2(total / rounds, true_mean)
    # One round's error spread over the rounds: about 1/rounds of the drift without it.
    assert errors[True] < errors[False] / 8
