"""All-reduce rounds with peers that die, stall or cheat: survivors finish, agree and say
exactly what was averaged; cheaters are refused and scored."""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dandelion_p2p.averaging.allreduce import AllReducePeer, Send
from dandelion_p2p.averaging.messages import (
    ChunkHeader,
    ResultHeader,
    pack_frame,
    payload_digest,
    unpack_frame,
)
from dandelion_p2p.averaging.report import ChunkStatus, ExclusionReason
from dandelion_p2p.averaging.sends import MAX_RESENDS
from dandelion_p2p.identity import Identity
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import Reject, RejectCode
from tests.averaging.test_allreduce import (
    BY_ID,
    Swarm,
    build,
    check_consistent,
    correlated_vectors,
    relative_l2,
)

# --------------------------------------------------------------------------- helpers


def reducer_ids(swarm: Swarm) -> list[bytes]:
    n = next(iter(swarm.buffers.values())).size
    return list(swarm.spec.partition(n).reducers)


def span_of(swarm: Swarm, peer: bytes) -> slice:
    n = next(iter(swarm.buffers.values())).size
    span = swarm.spec.partition(n).span_of(peer)
    return slice(span.start, span.end)


def sign_chunk(ident: Identity, h: ChunkHeader) -> ChunkHeader:
    return h.signed_with(ident.sign)


def sign_result(ident: Identity, h: ResultHeader) -> ResultHeader:
    return h.signed_with(ident.sign)


def reframe(header: ChunkHeader | ResultHeader, payload: bytes) -> bytes:
    return b"".join(pack_frame(header, payload))


def split(frame: bytes) -> tuple[ChunkHeader | ResultHeader, bytes]:
    header, payload = unpack_frame(frame)
    assert isinstance(header, ChunkHeader | ResultHeader)
    return header, bytes(payload)


def nan_tamper(byzantine: bytes):
    """Rewrite the byzantine peer's chunks to hold NaN, digested and signed properly."""

    def tamper(src: bytes, send: Send, frame: bytes) -> bytes | None:
        if src != byzantine or send.kind != "chunk":
            return frame
        header, _payload = split(frame)
        assert isinstance(header, ChunkHeader)
        bad = np.full((header.end - header.start), np.nan, dtype="<f4").tobytes()
        header = dataclasses.replace(header, digest=payload_digest(bad))
        return reframe(sign_chunk(BY_ID[byzantine], header), bad)

    return tamper


def excluded(report, peer: bytes) -> set[tuple[str, ExclusionReason]]:
    return {(e.role, e.reason) for e in report.excluded if e.peer == peer}


def events_for(swarm: Swarm, observer: bytes, peer: bytes) -> list[ScoreEvent]:
    return [e for p, e in swarm.events(observer) if p == peer]


# ------------------------------------------------------------------- crashes, stalls


@pytest.mark.parametrize("n", [3, 4, 6])
def test_reducer_dying_before_results_leaves_its_span_local_everywhere(n: int) -> None:
    swarm = build(n, size=6000, seed=n, bandwidths=[100.0] * n)
    victim = reducer_ids(swarm)[1]
    swarm.net.kill_at(0.0, victim)
    swarm.net.start()
    swarm.net.run()
    reports = check_consistent(swarm)
    sl = span_of(swarm, victim)
    size = next(iter(swarm.buffers.values())).size
    survivors = [p for p in swarm.spec.peer_ids if p != victim]
    for peer in survivors:
        rep = reports[peer]
        np.testing.assert_array_equal(swarm.buffers[peer][sl], swarm.originals[peer][sl])
        victim_span = rep.spans[swarm.spec.index_of(victim)]
        assert victim_span.status == "local"
        assert rep.fraction_averaged == (size - (sl.stop - sl.start)) / size
        assert not rep.complete
        assert ("reducer", ExclusionReason.FAILED) in excluded(rep, victim)
        for span in rep.spans:
            if span.reducer != victim and span.size:
                assert span.status == "averaged"
                assert set(span.contributors) == set(survivors)
        assert events_for(swarm, peer, victim) == [ScoreEvent.TIMEOUT]
    # The survivors agree on every span whose reducer lived.
    live = [s for s in reducer_ids(swarm) if s != victim]
    for r in live:
        rs = span_of(swarm, r)
        for peer in survivors[1:]:
            np.testing.assert_array_equal(swarm.buffers[peer][rs], swarm.buffers[survivors[0]][rs])


def test_reducer_dying_mid_results_reports_exactly_what_arrived() -> None:
    n = 4
    options = dict(size=40000, seed=11, bandwidths=[100.0] * n, net_bandwidth=2e5)
    dry = build(n, **options)  # type: ignore[arg-type]
    victim = reducer_ids(dry)[0]
    dry.net.record = True
    dry.net.start()
    dry.net.run()
    results_at = sorted(
        t
        for t, src, _, f in dry.net.delivered
        if src == victim and isinstance(unpack_frame(f)[0], ResultHeader)
    )
    swarm = build(n, **options)  # type: ignore[arg-type]
    swarm.net.kill_at(results_at[len(results_at) // 2], victim)
    swarm.net.start()
    swarm.net.run()
    reports = check_consistent(swarm)
    statuses = {
        c.status
        for p, rep in reports.items()
        for c in rep.spans[swarm.spec.index_of(victim)].chunks
    }
    assert ChunkStatus.LOCAL in statuses and ChunkStatus.AVERAGED in statuses
    for rep in reports.values():
        assert 0.0 < rep.fraction_averaged < 1.0 and not rep.complete


@pytest.mark.parametrize("notify", [True, False])
def test_sender_dying_mid_round_is_excluded_consistently(notify: bool) -> None:
    n = 5
    accepts = [True, True, True, True, False]
    swarm = build(
        n,
        size=40000,
        seed=5,
        accepts=accepts,
        bandwidths=[100.0] * n,
        net_bandwidth=2e5,
        chunk_timeout=2.0,
    )
    victim = next(
        p
        for p, a in zip(
            swarm.spec.peer_ids, [m.accepts_connections for m in swarm.spec.members], strict=True
        )
        if not a
    )
    assert victim not in reducer_ids(swarm)
    swarm.net.kill_at(0.1, victim, notify_after=0.3 if notify else None)
    swarm.net.start()
    swarm.net.run()
    reports = check_consistent(swarm)
    survivors = [p for p in swarm.spec.peer_ids if p != victim]
    reason = ExclusionReason.FAILED if notify else ExclusionReason.TIMEOUT
    for peer in survivors:
        rep = reports[peer]
        assert excluded(rep, victim) == {("sender", reason)}
        assert ScoreEvent.TIMEOUT in events_for(swarm, peer, victim)
        assert not rep.complete
        # Only fully averaged spans here (the victim reduced nothing), but the victim is in
        # the early chunks and not the late ones.
        assert rep.fraction_averaged == 1.0
        own = rep.spans[swarm.spec.index_of(peer)]
        with_victim = [victim in c.contributors for c in own.chunks]
        assert with_victim[0] and not with_victim[-1]
        # Consistent: once out, out of every later chunk.
        assert with_victim == sorted(with_victim, reverse=True)
    first = swarm.buffers[survivors[0]]
    for peer in survivors[1:]:
        np.testing.assert_array_equal(swarm.buffers[peer], first)


def test_stalled_peer_is_timed_out_and_the_round_finishes() -> None:
    n = 4
    swarm = build(n, size=6000, seed=2, bandwidths=[100.0] * n, chunk_timeout=3.0)
    stalled = swarm.spec.peer_ids[2]
    swarm.net.stalled.add(stalled)
    swarm.net.start()
    swarm.net.run()
    assert swarm.net.now >= 6.0  # the result timeout (2 x chunk timeout) had to pass
    reports = check_consistent(swarm)
    sl = span_of(swarm, stalled)
    size = next(iter(swarm.buffers.values())).size
    for peer, rep in reports.items():
        assert excluded(rep, stalled) == {
            ("sender", ExclusionReason.TIMEOUT),
            ("reducer", ExclusionReason.TIMEOUT),
        }
        assert events_for(swarm, peer, stalled) == [ScoreEvent.TIMEOUT]
        assert rep.fraction_averaged == (size - (sl.stop - sl.start)) / size
        np.testing.assert_array_equal(swarm.buffers[peer][sl], swarm.originals[peer][sl])
        d = rep.to_dict()
        assert d["complete"] is False and d["excluded"][0]["reason"] == "timeout"


def test_late_frames_after_a_timeout_are_ignored() -> None:
    swarm = build(3, size=3000, seed=4, bandwidths=[100.0] * 3, chunk_timeout=1.0)
    a, b, c = swarm.spec.peer_ids
    held: list[tuple[bytes, bytes, bytes]] = []

    def hold(src: bytes, send: Send, frame: bytes) -> bytes | None:
        if src == c:
            held.append((src, send.recipient, frame))
            return None
        return frame

    swarm.net.tamper = hold
    swarm.net.start()
    swarm.net.run()
    swarm.net.tamper = None
    check_consistent(swarm)
    # C, excluded everywhere for being late, still got the results: it holds the same values
    # as A and B on their spans, and only its own span differs.
    c_report = swarm.peers[c].report()
    for r in (a, b):
        sl = span_of(swarm, r)
        if sl.stop > sl.start:
            np.testing.assert_array_equal(swarm.buffers[c][sl], swarm.buffers[a][sl])
            assert c_report.spans[swarm.spec.index_of(r)].contributors == (a, b)
        assert excluded(swarm.peers[r].report(), c) == {
            ("sender", ExclusionReason.TIMEOUT),
            ("reducer", ExclusionReason.TIMEOUT),
        }
    before = {p: swarm.buffers[p].copy() for p in (a, b)}
    reports = {p: swarm.peers[p].report() for p in (a, b)}
    for src, dst, frame in held:
        if dst in (a, b):
            assert swarm.peers[dst].on_frame(src, frame, swarm.net.now) == []
    for p in (a, b):
        np.testing.assert_array_equal(swarm.buffers[p], before[p])
        assert swarm.peers[p].report().spans == reports[p].spans
        assert swarm.peers[p].report().violations == ()


def test_disconnect_after_a_finished_round_is_not_an_exclusion() -> None:
    swarm = build(3, size=3000, seed=6)
    swarm.net.start()
    swarm.net.run()
    a, b, _ = swarm.spec.peer_ids
    events = swarm.events(a)
    assert swarm.peers[a].on_peer_failed(b, swarm.net.now, "closed") == []
    rep = swarm.peers[a].report()
    assert rep.complete and rep.excluded == ()
    assert swarm.events(a) == events


# ------------------------------------------------------------------------ byzantine

BYZANTINE_KINDS = ["scale", "noise", "nan"]


@pytest.mark.parametrize("kind", BYZANTINE_KINDS)
def test_centered_clip_bounds_a_byzantine_sender(kind: str) -> None:
    n = 8
    rng = np.random.default_rng(13)
    vectors = correlated_vectors(rng, n, 16000, spread=0.15)
    weights = [float(w) for w in rng.uniform(10.0, 20.0, n)]
    bad_index = 3
    if kind == "scale":
        vectors[bad_index] = vectors[bad_index] * 1000
    elif kind == "noise":
        vectors[bad_index] = (rng.standard_normal(16000) * 30).astype(np.float32)
    swarm = build(
        n,
        mode="centered_clip",
        vectors=vectors,
        weights=weights,
        bandwidths=[100.0] * n,
        max_chunk=2048,
    )
    byzantine = swarm.spec.peer_ids[bad_index]
    if kind == "nan":
        swarm.net.tamper = nan_tamper(byzantine)
    swarm.net.start()
    swarm.net.run()
    honest = [p for p in swarm.spec.peer_ids if p != byzantine]
    honest_mean = swarm.mean_of(honest, slice(None))
    first = swarm.buffers[honest[0]]
    assert relative_l2(first, honest_mean) <= 0.05
    for peer in honest:
        np.testing.assert_array_equal(swarm.buffers[peer], first)
        rep = swarm.peers[peer].report()
        assert rep.done
        own = swarm.spec.index_of(peer)
        if rep.spans[own].size:
            got = events_for(swarm, peer, byzantine)
            expected = ScoreEvent.MALFORMED if kind == "nan" else ScoreEvent.OUTLIER
            assert expected in got and ScoreEvent.SUCCESS not in got
            if kind == "nan":
                assert excluded(rep, byzantine) == {("sender", ExclusionReason.MALFORMED)}
                assert all(byzantine not in c.contributors for c in rep.spans[own].chunks)
        for other in honest:
            if other != peer and rep.spans[own].size:
                assert (other, ScoreEvent.SUCCESS) in swarm.events(peer)


def test_nan_sender_under_plain_mean_is_excluded_and_the_rest_averaged_exactly() -> None:
    n = 5
    swarm = build(n, size=6000, seed=8, bandwidths=[100.0] * n)
    byzantine = swarm.spec.peer_ids[1]
    swarm.net.tamper = nan_tamper(byzantine)
    swarm.net.start()
    swarm.net.run()
    reports = check_consistent(swarm)
    honest = [p for p in swarm.spec.peer_ids if p != byzantine]
    for peer in honest:
        rep = reports[peer]
        assert not rep.complete
        own = rep.spans[swarm.spec.index_of(peer)]
        assert all(c.contributors == tuple(honest) for c in own.chunks)


# ---------------------------------------------------------------- hostile frames


@pytest.fixture
def trio() -> tuple[Swarm, bytes, bytes, bytes, list[Send]]:
    """Three started peers; A's unsent chunk frames to B."""
    swarm = build(3, size=6000, seed=21, bandwidths=[100.0] * 3, max_chunk=1024)
    a, b, c = swarm.spec.peer_ids
    sends = {p: swarm.peers[p].start(0.0) for p in (a, b, c)}
    to_b = [s for s in sends[a] if s.recipient == b]
    return swarm, a, b, c, to_b


def assert_refused(out: list[Send], code: RejectCode) -> None:
    assert len(out) >= 1 and out[-1].kind == "reject"
    reject, payload = unpack_frame(out[-1].frame())
    assert isinstance(reject, Reject) and reject.code == code and not payload


def test_forged_signature_is_refused_scored_and_excludes_the_sender(trio) -> None:
    swarm, a, b, c, to_b = trio
    header, payload = split(to_b[0].frame())
    forged = dataclasses.replace(header, signature=bytes(64))
    out = swarm.peers[b].on_frame(a, reframe(forged, payload), 0.1)
    assert_refused(out, RejectCode.BAD_SIGNATURE)
    # Signed by C's key while claiming to be A.
    by_c = sign_chunk(BY_ID[c], header)
    assert_refused(
        swarm.peers[b].on_frame(a, reframe(by_c, payload), 0.1), RejectCode.BAD_SIGNATURE
    )
    rep = swarm.peers[b].report()
    assert excluded(rep, a) == {("sender", ExclusionReason.BAD_SIGNATURE)}
    assert events_for(swarm, b, a) == [ScoreEvent.BAD_SIGNATURE, ScoreEvent.BAD_SIGNATURE]
    # Later genuine chunks from A are no longer counted.
    assert swarm.peers[b].on_frame(a, to_b[1].frame(), 0.2) == []


def test_frame_relayed_by_another_peer_is_refused(trio) -> None:
    swarm, a, b, c, to_b = trio
    out = swarm.peers[b].on_frame(c, to_b[0].frame(), 0.1)
    assert_refused(out, RejectCode.FORBIDDEN)
    assert events_for(swarm, b, c) == [ScoreEvent.MALFORMED]
    assert events_for(swarm, b, a) == []


def test_chunk_replayed_from_an_earlier_round_is_refused_and_scored() -> None:
    first = build(3, size=4000, seed=30, bandwidths=[100.0] * 3, round_=1)
    first.net.record = True
    first.net.start()
    first.net.run()
    a, b, _ = first.spec.peer_ids
    old = [f for _, src, dst, f in first.net.delivered if src == a and dst == b]
    old_chunks = [f for f in old if isinstance(unpack_frame(f)[0], ChunkHeader)]
    assert old_chunks

    second = build(3, size=4000, seed=31, bandwidths=[100.0] * 3, round_=2)
    second.net.start()
    # The replay lands first, before A's genuine round-2 chunks.
    out = second.peers[b].on_frame(a, old_chunks[0], 0.0)
    assert_refused(out, RejectCode.UNEXPECTED)
    assert events_for(second, b, a) == [ScoreEvent.MALFORMED]
    second.net.run()
    rep = check_consistent(second)[b]
    # A replay says nothing about this round: A still counted, the round complete.
    assert rep.complete and rep.excluded == ()
    assert [v.code for v in rep.violations] == ["UNEXPECTED"]


def test_chunk_for_the_wrong_span_is_refused(trio) -> None:
    swarm, a, b, c, to_b = trio
    header, payload = split(to_b[0].frame())
    # A span B does not reduce, addressed to B and signed by A.
    wrong_span = sign_chunk(
        BY_ID[a], dataclasses.replace(header, span_index=swarm.spec.index_of(c))
    )
    out = swarm.peers[b].on_frame(a, reframe(wrong_span, payload), 0.1)
    assert_refused(out, RejectCode.INVALID_FIELD)
    assert events_for(swarm, b, a) == [ScoreEvent.MALFORMED]
    assert excluded(swarm.peers[b].report(), a) == {("sender", ExclusionReason.MALFORMED)}


def test_chunk_for_another_recipient_is_refused() -> None:
    swarm = build(3, size=6000, seed=22, bandwidths=[100.0] * 3)
    a, b, c = swarm.spec.peer_ids
    sends = swarm.peers[a].start(0.0)
    swarm.peers[b].start(0.0)
    for_c = next(s for s in sends if s.recipient == c)
    out = swarm.peers[b].on_frame(a, for_c.frame(), 0.1)
    assert_refused(out, RejectCode.INVALID_FIELD)
    assert events_for(swarm, b, a) == [ScoreEvent.MALFORMED]
    assert excluded(swarm.peers[b].report(), a) == {("sender", ExclusionReason.MALFORMED)}


def test_truncated_and_garbled_frames_never_crash(trio) -> None:
    swarm, a, b, _c, to_b = trio
    frame = to_b[0].frame()
    head_len = int.from_bytes(frame[:4], "big")
    cuts = [0, 1, 3, 4, 5, 4 + head_len - 1, 4 + head_len, 4 + head_len + 1, len(frame) - 1]
    for cut in cuts:
        out = swarm.peers[b].on_frame(a, frame[:cut], 0.1)
        assert out and out[-1].kind == "reject"
    # A header length far beyond the frame.
    assert swarm.peers[b].on_frame(a, b"\xff\xff\xff\xff", 0.1)[-1].kind == "reject"
    rep = swarm.peers[b].report()
    assert len(rep.violations) == len(cuts) + 1
    assert all(e is ScoreEvent.MALFORMED for p, e in swarm.events(b) if p == a)
    assert excluded(rep, a) == {("sender", ExclusionReason.MALFORMED)}


def test_duplicate_chunks_are_dropped_up_to_the_resends_then_scored_but_not_excluding(
    trio,
) -> None:
    swarm, a, b, _c, to_b = trio
    frame = to_b[0].frame()
    assert swarm.peers[b].on_frame(a, frame, 0.1) == []
    # A sender that lost its channel sends again what it may have lost: dropped, unscored...
    chunks = len(next(s for s in swarm.peers[b].report().spans if s.reducer == b).chunks)
    for _ in range(MAX_RESENDS * chunks):
        assert swarm.peers[b].on_frame(a, frame, 0.2) == []
    assert events_for(swarm, b, a) == []
    # ...but no more copies than its resends can make.
    assert_refused(swarm.peers[b].on_frame(a, frame, 0.2), RejectCode.UNEXPECTED)
    assert events_for(swarm, b, a) == [ScoreEvent.MALFORMED]
    assert swarm.peers[b].report().excluded == ()


def test_digest_mismatch_and_bad_layout_are_refused(trio) -> None:
    swarm, a, b, _c, to_b = trio
    header, payload = split(to_b[0].frame())
    flipped = bytes([payload[0] ^ 1]) + payload[1:]
    out = swarm.peers[b].on_frame(a, reframe(header, flipped), 0.1)
    assert_refused(out, RejectCode.INVALID_FIELD)

    swarm2 = build(3, size=6000, seed=21, bandwidths=[100.0] * 3, max_chunk=1024)
    for p in swarm2.spec.peer_ids:
        swarm2.peers[p].start(0.0)
    shifted = sign_chunk(BY_ID[a], dataclasses.replace(header, start=header.start + 1))
    out = swarm2.peers[b].on_frame(a, reframe(shifted, payload[:-4]), 0.1)
    assert_refused(out, RejectCode.INVALID_FIELD)
    heavier = sign_chunk(BY_ID[a], dataclasses.replace(header, weight=header.weight * 10))
    swarm3 = build(3, size=6000, seed=21, bandwidths=[100.0] * 3, max_chunk=1024)
    out = swarm3.peers[b].on_frame(a, reframe(heavier, payload), 0.1)
    assert_refused(out, RejectCode.INVALID_FIELD)


def test_other_view_of_the_group_is_refused_unscored_and_not_awaited(trio) -> None:
    swarm, a, b, _c, to_b = trio
    header, payload = split(to_b[0].frame())
    other = sign_chunk(BY_ID[a], dataclasses.replace(header, group_id=bytes(32)))
    out = swarm.peers[b].on_frame(a, reframe(other, payload), 0.1)
    assert_refused(out, RejectCode.OTHER_GROUP)
    assert events_for(swarm, b, a) == []
    assert excluded(swarm.peers[b].report(), a) == {
        ("sender", ExclusionReason.GROUP_MISMATCH),
        ("reducer", ExclusionReason.GROUP_MISMATCH),
    }


def run_until_result(swarm: Swarm, reducer: bytes, recipient: bytes) -> bytes:
    """Run a round while capturing (and withholding) ``reducer``'s first result to
    ``recipient``."""
    captured: list[bytes] = []

    def grab(src: bytes, send: Send, frame: bytes) -> bytes | None:
        if src == reducer and send.recipient == recipient and send.kind == "result":
            captured.append(frame)
            return None
        return frame

    swarm.net.tamper = grab
    swarm.net.start()
    while not captured:
        assert swarm.net.queue
        ev = heapq.heappop(swarm.net.queue)
        swarm.net.now = ev.at
        swarm.net._handle(ev)
    swarm.net.tamper = None
    return captured[0]


@pytest.mark.parametrize(
    "attack", ["signature", "not_owner", "non_member", "weights", "digest", "order"]
)
def test_invalid_results_are_refused_and_leave_the_chunk_local(attack: str) -> None:
    swarm = build(3, size=3000, seed=40, bandwidths=[100.0] * 3, max_chunk=1024)
    a, b, c = swarm.spec.peer_ids
    frame = run_until_result(swarm, b, a)
    header, payload = split(frame)
    assert isinstance(header, ResultHeader)
    sender = b
    event = ScoreEvent.MALFORMED
    code = RejectCode.INVALID_FIELD
    if attack == "signature":
        header = dataclasses.replace(header, signature=bytes(64))
        event, code = ScoreEvent.BAD_SIGNATURE, RejectCode.BAD_SIGNATURE
    elif attack == "not_owner":
        # C claims B's span.
        header = sign_result(
            BY_ID[c], dataclasses.replace(header, reducer=c, contributors=(a, b, c))
        )
        sender = c
    elif attack == "non_member":
        outsider = Identity.from_seed(b"\x77" * 32).peer_id_bytes
        contributors = tuple(sorted((*header.contributors, outsider)))
        header = sign_result(
            BY_ID[b],
            dataclasses.replace(
                header, contributors=contributors, weights=(1.0,) * len(contributors)
            ),
        )
    elif attack == "weights":
        header = sign_result(
            BY_ID[b], dataclasses.replace(header, weights=tuple(w * 2 for w in header.weights))
        )
    elif attack == "digest":
        payload = bytes([payload[0] ^ 1]) + payload[1:]
    elif attack == "order":
        header = sign_result(
            BY_ID[b],
            dataclasses.replace(
                header,
                contributors=tuple(reversed(header.contributors)),
                weights=tuple(reversed(header.weights)),
            ),
        )
    before = swarm.buffers[a].copy()
    out = swarm.peers[a].on_frame(sender, reframe(header, payload), swarm.net.now)
    assert_refused(out, code)
    assert event in events_for(swarm, a, sender)
    np.testing.assert_array_equal(swarm.buffers[a], before)
    swarm.net.run()
    rep = swarm.peers[a].report()
    chunk = rep.spans[swarm.spec.index_of(b)].chunks[header.chunk_index]
    if attack == "not_owner":
        # C's forgery named no chunk it owns; B's genuine result was withheld, so it timed out.
        assert chunk.status is ChunkStatus.LOCAL
    else:
        assert chunk.status is ChunkStatus.LOCAL and "invalid result" in chunk.reason
    assert not rep.complete
    check_consistent(swarm)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_frames_are_never_accepted_wrongly_nor_crash(data) -> None:
    swarm = build(3, size=2048, seed=50, bandwidths=[100.0] * 3, max_chunk=1024)
    a, b, _c = swarm.spec.peer_ids
    sends = swarm.peers[a].start(0.0)
    swarm.peers[b].start(0.0)
    frame = bytearray(next(s for s in sends if s.recipient == b).frame())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    before = swarm.buffers[b].copy()
    out = swarm.peers[b].on_frame(a, bytes(frame), 0.1)
    assert all(s.kind in ("reject", "result") for s in out)
    rep = swarm.peers[b].report()
    if rep.violations:
        assert out[-1].kind == "reject"
    # Whatever happened, B never wrote anything it did not report.
    check_buf = swarm.buffers[b]
    for span in rep.spans:
        for ch in span.chunks:
            if ch.status is ChunkStatus.PENDING:
                np.testing.assert_array_equal(
                    check_buf[ch.start : ch.end], before[ch.start : ch.end]
                )


def test_rejects_received_are_reported_not_answered(trio) -> None:
    swarm, a, b, _c, _to_b = trio
    frame = b"".join(pack_frame(Reject(code=int(RejectCode.TIMEOUT), detail="late")))
    assert swarm.peers[b].on_frame(a, frame, 0.1) == []
    rep = swarm.peers[b].report()
    assert [(v.code, v.detail) for v in rep.rejects_received] == [("TIMEOUT", "late")]
    assert rep.violations == () and swarm.events(b) == []


def test_a_member_that_says_it_laid_the_round_out_otherwise_is_given_up_at_once(trio) -> None:
    # A left someone out that B did not (it remembered a failure B never saw, say): B's
    # frames get OTHER_GROUP back, and B stops waiting for A instead of timing out on it.
    swarm, a, b, _c, _to_b = trio
    frame = b"".join(pack_frame(Reject(code=int(RejectCode.OTHER_GROUP), detail="another view")))
    out = swarm.peers[b].on_frame(a, frame, 0.1)
    assert all(send.recipient != a for send in out), "nothing more goes to A, no reject"
    rep = swarm.peers[b].report()
    assert excluded(rep, a) == {
        ("sender", ExclusionReason.GROUP_MISMATCH),
        ("reducer", ExclusionReason.GROUP_MISMATCH),
    }
    assert rep.violations == () and swarm.events(b) == []
    # From a peer outside the group the same reject changes nothing.
    outsider = Identity.generate().peer_id_bytes
    before = swarm.peers[b].report()
    swarm.peers[b].on_frame(outsider, frame, 0.2)
    assert swarm.peers[b].report().excluded_peers() == before.excluded_peers()


def test_local_misuse_raises() -> None:
    swarm = build(2, size=1000)
    a, _b = swarm.spec.peer_ids
    ident = BY_ID[a]
    good = np.zeros(1000, np.float32)
    kwargs = dict(peer_id=a, sign=ident.sign, spec=swarm.spec)
    with pytest.raises(ValueError):
        AllReducePeer(**kwargs, buffer=np.zeros(1000, np.float64))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AllReducePeer(**kwargs, buffer=np.full(1000, np.nan, np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AllReducePeer(**kwargs, buffer=good, codec="zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AllReducePeer(**kwargs, buffer=good, weight=123456.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AllReducePeer(**kwargs, buffer=good, max_chunk=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AllReducePeer(**kwargs, buffer=good, chunk_timeout=0.0)  # type: ignore[arg-type]
    outsider = Identity.from_seed(b"\x55" * 32)
    with pytest.raises(ValueError):
        AllReducePeer(
            peer_id=outsider.peer_id_bytes, sign=outsider.sign, spec=swarm.spec, buffer=good
        )
    peer = AllReducePeer(**kwargs, buffer=good)  # type: ignore[arg-type]
    peer.start(0.0)
    with pytest.raises(RuntimeError):
        peer.start(1.0)
