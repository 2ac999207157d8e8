"""The parts of the all-reduce state machine on their own, without a network: the checks every
frame passes first, the round's ledger, the frames going out, the reducer of our span and the
receiver of the other spans' results."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from dandelion_p2p.averaging.admission import GROUP_MISMATCH_DETAIL, Admission, Refusal
from dandelion_p2p.averaging.compression import get_codec
from dandelion_p2p.averaging.group import GroupSpec, Member
from dandelion_p2p.averaging.ledger import MAX_REPORTED_VIOLATIONS, RoundLedger
from dandelion_p2p.averaging.messages import (
    UNSIGNED,
    ChunkHeader,
    ResultHeader,
    payload_digest,
    unpack_frame,
    verify_chunk,
    verify_result,
)
from dandelion_p2p.averaging.partition import Chunk, split_chunks
from dandelion_p2p.averaging.report import ChunkStatus, ExcludedPeer, ExclusionReason
from dandelion_p2p.averaging.result_receiver import ResultReceiver
from dandelion_p2p.averaging.sends import MAX_RESENDS, Framer, Send
from dandelion_p2p.averaging.span_reducer import SpanReducer
from dandelion_p2p.identity import Identity
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import Reject, RejectCode

RUN = b"run-parts"
IDS = sorted((Identity.from_seed(bytes([i + 40]) * 32) for i in range(3)),
             key=lambda i: i.peer_id_bytes)
A, B, C = IDS
SPEC = GroupSpec.of(RUN, 7, [Member(i.peer_id_bytes, 2.0 + n, 100.0) for n, i in enumerate(IDS)])
CODEC = get_codec("none")
SIZE = 3 * 1024


def span_chunks(max_chunk: int = 512) -> tuple[tuple[Chunk, ...], ...]:
    partition = SPEC.partition(SIZE)
    return tuple(split_chunks(s.start, s.end, max_chunk, SPEC.block_size) for s in partition.spans)


def chunk_from(sender: Identity, recipient: Identity, chunk: Chunk, values: np.ndarray,
               **changes: Any) -> tuple[ChunkHeader, memoryview]:
    payload = memoryview(values.astype("<f4").tobytes())
    header = ChunkHeader(
        run=RUN, round=7, group_id=SPEC.group_id, span_index=SPEC.index_of(recipient.peer_id_bytes),
        chunk_index=chunk.index, start=chunk.start, end=chunk.end, sender=sender.peer_id_bytes,
        recipient=recipient.peer_id_bytes, codec="none",
        weight=SPEC.member(sender.peer_id_bytes).weight if sender.peer_id_bytes in SPEC else 1.0,
        digest=payload_digest(payload),
        signature=UNSIGNED,
    )
    return dataclasses.replace(header, **changes).signed_with(sender.sign), payload


def result_from(reducer: Identity, chunk: Chunk, values: np.ndarray,
                contributors: tuple[bytes, ...] | None = None) -> tuple[ResultHeader, memoryview]:
    payload = memoryview(values.astype("<f4").tobytes())
    contributors = contributors or SPEC.peer_ids
    header = ResultHeader(
        run=RUN, round=7, group_id=SPEC.group_id,
        span_index=SPEC.index_of(reducer.peer_id_bytes), chunk_index=chunk.index,
        start=chunk.start, end=chunk.end, reducer=reducer.peer_id_bytes,
        contributors=contributors, weights=tuple(SPEC.member(p).weight for p in contributors),
        codec="none", digest=payload_digest(payload), signature=UNSIGNED,
    )
    return header.signed_with(reducer.sign), payload


# ----------------------------------------------------------------------------- admission


def test_admission_passes_a_member_s_frame_of_this_round_and_group() -> None:
    chunk = span_chunks()[SPEC.index_of(B.peer_id_bytes)][0]
    header, _ = chunk_from(A, B, chunk, np.zeros(chunk.size))
    assert Admission(SPEC).check(A.peer_id_bytes, header) is None


def test_admission_refuses_in_order_and_says_what_each_refusal_costs() -> None:
    admission = Admission(SPEC)
    chunk = span_chunks()[SPEC.index_of(B.peer_id_bytes)][0]
    header, _ = chunk_from(A, B, chunk, np.zeros(chunk.size))

    impostor = admission.check(C.peer_id_bytes, header)
    assert impostor == Refusal(RejectCode.FORBIDDEN, "chunk signed as another peer", exclude=True)

    forged = dataclasses.replace(header, chunk_index=1)
    refusal = admission.check(A.peer_id_bytes, forged)
    assert refusal is not None and refusal.code is RejectCode.BAD_SIGNATURE
    assert refusal.event is ScoreEvent.BAD_SIGNATURE and refusal.exclude and not refusal.settle

    # Re-signed frames of another round or group: signed right, still not for this round.
    replay, _ = chunk_from(A, B, chunk, np.zeros(chunk.size), round=6)
    assert admission.check(A.peer_id_bytes, replay) == Refusal(
        RejectCode.UNEXPECTED, "chunk of round 6"
    )
    other_view, _ = chunk_from(A, B, chunk, np.zeros(chunk.size), group_id=b"\x01" * 32)
    assert admission.check(A.peer_id_bytes, other_view) == Refusal(
        RejectCode.OTHER_GROUP, GROUP_MISMATCH_DETAIL, other_group=True
    )

    stranger = Identity.from_seed(b"\x77" * 32)
    outsider, _ = chunk_from(stranger, B, chunk, np.zeros(chunk.size))
    assert admission.check(stranger.peer_id_bytes, outsider) == Refusal(
        RejectCode.FORBIDDEN, "sender is not a member"
    )


def test_a_result_with_a_bad_signature_costs_its_chunk_not_its_reducer_s_place() -> None:
    chunk = span_chunks()[SPEC.index_of(C.peer_id_bytes)][0]
    header, _ = result_from(C, chunk, np.zeros(chunk.size))
    forged = dataclasses.replace(header, digest=b"\x00" * 32)
    refusal = Admission(SPEC).check(C.peer_id_bytes, forged)
    assert refusal is not None and refusal.settle and not refusal.exclude
    assert refusal.detail == "result signature"
    assert Admission(SPEC).check(A.peer_id_bytes, header) == Refusal(
        RejectCode.FORBIDDEN, "result signed as another peer", exclude=True
    )


# -------------------------------------------------------------------------------- ledger


def test_the_ledger_keeps_one_exclusion_per_peer_and_role_and_one_timeout_per_peer() -> None:
    ledger = RoundLedger()
    peer = A.peer_id_bytes
    ledger.add_exclusion(ExcludedPeer(peer, "sender", ExclusionReason.TIMEOUT, 1.0))
    ledger.add_exclusion(ExcludedPeer(peer, "sender", ExclusionReason.FAILED, 2.0))
    ledger.add_exclusion(ExcludedPeer(peer, "reducer", ExclusionReason.FAILED, 2.0))
    assert [(e.role, e.reason) for e in ledger.excluded] == [
        ("sender", ExclusionReason.TIMEOUT),
        ("reducer", ExclusionReason.FAILED),
    ]
    assert ledger.was_excluded(peer) and not ledger.was_excluded(B.peer_id_bytes)
    ledger.score_timeout(peer)
    ledger.score_timeout(peer)
    ledger.event(B.peer_id_bytes, ScoreEvent.SUCCESS)
    assert ledger.events == [(peer, ScoreEvent.TIMEOUT), (B.peer_id_bytes, ScoreEvent.SUCCESS)]
    assert ledger.was_penalized(peer) and not ledger.was_penalized(B.peer_id_bytes)


def test_the_ledger_bounds_what_it_keeps_of_violations_and_rejects() -> None:
    ledger = RoundLedger()
    for i in range(MAX_REPORTED_VIOLATIONS + 5):
        ledger.record_violation(A.peer_id_bytes, RejectCode.MALFORMED, f"frame {i}", float(i))
        ledger.record_reject(B.peer_id_bytes, 999, "?", float(i))
    assert len(ledger.violations) == MAX_REPORTED_VIOLATIONS
    assert ledger.violations_dropped == 5
    assert ledger.violations[0].code == "MALFORMED"
    assert len(ledger.rejects_received) == MAX_REPORTED_VIOLATIONS
    assert ledger.rejects_received[0].code == "code 999"


# -------------------------------------------------------------------------------- framer


def make_framer(buffer: np.ndarray, ledger: RoundLedger, me: Identity = A) -> Framer:
    return Framer(peer_id=me.peer_id_bytes, sign=me.sign, spec=SPEC, codec=CODEC,
                  buffer=buffer, error_feedback=None, count_sent=ledger.count_sent)


def test_a_chunk_frame_is_rendered_from_the_buffer_when_sent_and_counted_each_time() -> None:
    buffer = np.arange(SIZE, dtype=np.float32)
    ledger = RoundLedger()
    chunk = span_chunks()[SPEC.index_of(B.peer_id_bytes)][1]
    send = make_framer(buffer, ledger).chunk(SPEC.index_of(B.peer_id_bytes), chunk,
                                              B.peer_id_bytes)
    assert ledger.bytes_sent == 0  # nothing rendered yet
    buffer[chunk.start] = -1.0  # read at render time, not when the send was made
    frame = send.frame()
    header, payload = unpack_frame(frame)
    assert isinstance(header, ChunkHeader) and verify_chunk(header)
    assert np.frombuffer(payload, "<f4")[0] == -1.0
    assert ledger.bytes_sent == len(frame)
    send.buffers()
    assert ledger.bytes_sent == 2 * len(frame)


def test_result_frames_are_signed_once_and_shared_by_their_recipients() -> None:
    ledger = RoundLedger()
    chunk = span_chunks()[SPEC.index_of(A.peer_id_bytes)][0]
    values = np.ones(chunk.size, dtype=np.float32)
    sends = make_framer(values, ledger).results(
        0, chunk, SPEC.peer_ids, CODEC.encode_view(values), [B.peer_id_bytes, C.peer_id_bytes]
    )
    assert [s.recipient for s in sends] == [B.peer_id_bytes, C.peer_id_bytes]
    frames = [s.frame() for s in sends]
    assert frames[0] == frames[1]
    header, _ = unpack_frame(frames[0])
    assert isinstance(header, ResultHeader) and verify_result(header)
    assert header.weights == (2.0, 3.0, 4.0)
    assert ledger.bytes_sent == 2 * len(frames[0])


def test_a_reject_carries_a_bounded_detail() -> None:
    ledger = RoundLedger()
    send = make_framer(np.zeros(4, np.float32), ledger).reject(B.peer_id_bytes,
                                                                RejectCode.INVALID_FIELD, "x" * 900)
    reject, _ = unpack_frame(send.frame())
    assert isinstance(reject, Reject) and reject.code == RejectCode.INVALID_FIELD
    assert len(reject.detail) == 512 and send.kind == "reject"


# ----------------------------------------------------------------------------- reducer


def make_reducer(me: Identity = A, mode: str = "mean") -> tuple[SpanReducer, np.ndarray,
                                                                  RoundLedger]:
    buffer = np.full(SIZE, 1.0, dtype=np.float32)
    ledger = RoundLedger()
    index = SPEC.index_of(me.peer_id_bytes)
    reducer = SpanReducer(
        peer_id=me.peer_id_bytes, spec=SPEC, span_index=index, chunks=span_chunks()[index],
        buffer=buffer, codec=CODEC, mode=mode,  # type: ignore[arg-type]
        max_chunk=512, clip_iterations=5, outlier_ratio=3.0,
        error_feedback=None, ledger=ledger, framer=make_framer(buffer, ledger, me),
    )
    return reducer, buffer, ledger


def test_the_reducer_averages_a_chunk_once_every_counted_sender_delivered_it() -> None:
    reducer, buffer, ledger = make_reducer()
    chunk = span_chunks()[0][0]
    header, payload = chunk_from(B, A, chunk, np.full(chunk.size, 4.0))
    assert reducer.on_chunk(B.peer_id_bytes, header, payload, 1.0) == []
    assert reducer.in_progress == 1 and reducer.open_chunks == len(span_chunks()[0])
    header, payload = chunk_from(C, A, chunk, np.full(chunk.size, 7.0))
    sends = reducer.on_chunk(C.peer_id_bytes, header, payload, 2.0)
    assert isinstance(sends, list) and {s.recipient for s in sends} == {
        B.peer_id_bytes, C.peer_id_bytes
    }
    # Weights 2, 3, 4 over values 1, 4, 7.
    expected = (2.0 * 1 + 3.0 * 4 + 4.0 * 7) / 9.0
    np.testing.assert_allclose(buffer[chunk.start : chunk.end], expected, rtol=1e-6)
    outcome = reducer.outcomes[0]
    assert outcome is not None and outcome.status is ChunkStatus.AVERAGED
    assert reducer.in_progress == 0 and ledger.events == []


def test_the_reducer_drops_resent_chunks_then_refuses_duplicates_without_cutting_off() -> None:
    reducer, _, _ = make_reducer()
    chunk = span_chunks()[0][0]
    header, payload = chunk_from(B, A, chunk, np.zeros(chunk.size))
    assert reducer.on_chunk(B.peer_id_bytes, header, payload, 1.0) == []
    for _ in range(MAX_RESENDS * len(span_chunks()[0])):
        assert reducer.on_chunk(B.peer_id_bytes, header, payload, 1.5) == []
    assert reducer.on_chunk(B.peer_id_bytes, header, payload, 1.5) == Refusal(
        RejectCode.UNEXPECTED, "duplicate chunk"
    )
    wrong, payload = chunk_from(B, A, chunk, np.zeros(chunk.size), weight=9.0)
    refusal = reducer.on_chunk(B.peer_id_bytes, wrong, payload, 2.0)
    assert isinstance(refusal, Refusal) and refusal.exclude


def test_excluding_every_sender_finishes_the_span_alone_and_sends_to_the_living() -> None:
    reducer, buffer, ledger = make_reducer()
    assert reducer.late_senders(now=4.0, since=0.0, timeout=5.0) == []
    assert reducer.late_senders(now=5.0, since=0.0, timeout=5.0) == sorted(
        [B.peer_id_bytes, C.peer_id_bytes]
    )
    assert reducer.exclude_sender(B.peer_id_bytes, ExclusionReason.TIMEOUT, 5.0, "late")
    assert not reducer.exclude_sender(B.peer_id_bytes, ExclusionReason.TIMEOUT, 5.0, "again")
    ledger.gone.add(C.peer_id_bytes)
    assert reducer.exclude_sender(C.peer_id_bytes, ExclusionReason.FAILED, 5.0, "reset")
    sends = reducer.finish_ready()
    assert sends and all(s.recipient == B.peer_id_bytes for s in sends)
    assert reducer.open_chunks == 0
    assert all(o is not None and o.status is ChunkStatus.SOLO for o in reducer.outcomes)
    assert np.all(buffer == 1.0)
    assert [e.peer for e in ledger.excluded] == [B.peer_id_bytes, C.peer_id_bytes]


# ----------------------------------------------------------------------------- receiver


def make_receiver(me: Identity = A) -> tuple[ResultReceiver, np.ndarray, RoundLedger]:
    buffer = np.zeros(SIZE, dtype=np.float32)
    ledger = RoundLedger()
    receiver = ResultReceiver(spec=SPEC, partition=SPEC.partition(SIZE),
                              span_chunks=span_chunks(), my_span=SPEC.index_of(me.peer_id_bytes),
                              buffer=buffer, codec=CODEC, ledger=ledger)
    return receiver, buffer, ledger


def test_the_receiver_applies_a_valid_result_drops_resent_copies_and_refuses_others() -> None:
    receiver, buffer, _ = make_receiver()
    chunk = span_chunks()[SPEC.index_of(B.peer_id_bytes)][0]
    header, payload = result_from(B, chunk, np.full(chunk.size, 3.0))
    assert receiver.on_result(B.peer_id_bytes, header, payload, 1.0) is None
    assert np.all(buffer[chunk.start : chunk.end] == 3.0)
    outcome = receiver.outcomes(SPEC.index_of(B.peer_id_bytes))[0]
    assert outcome is not None and outcome.status is ChunkStatus.AVERAGED
    # The same signed result again (resent over a new channel) is dropped, as often as the
    # reducer's resends can send it; another result for the chunk, or more copies, are not.
    other, other_payload = result_from(B, chunk, np.full(chunk.size, 4.0))
    assert receiver.on_result(B.peer_id_bytes, other, other_payload, 1.0) == Refusal(
        RejectCode.UNEXPECTED, "duplicate result"
    )
    for _ in range(MAX_RESENDS * len(span_chunks()[SPEC.index_of(B.peer_id_bytes)])):
        assert receiver.on_result(B.peer_id_bytes, header, payload, 1.0) is None
    assert np.all(buffer[chunk.start : chunk.end] == 3.0)
    assert receiver.on_result(B.peer_id_bytes, header, payload, 1.0) == Refusal(
        RejectCode.UNEXPECTED, "duplicate result"
    )


def test_a_chunk_given_up_on_stays_local_even_when_its_result_comes_late() -> None:
    receiver, buffer, ledger = make_receiver()
    span = SPEC.index_of(C.peer_id_bytes)
    chunks = span_chunks()[span]
    assert receiver.overdue(now=10.0, since=0.0, timeout=10.0) == [
        SPEC.peer_ids[i] for i in sorted({SPEC.index_of(B.peer_id_bytes), span})
    ]
    receiver.abandon(C.peer_id_bytes, ExclusionReason.TIMEOUT, 10.0, "no result in time")
    assert not receiver.owes(C.peer_id_bytes)
    assert receiver.unsettled_chunks == len(span_chunks()[SPEC.index_of(B.peer_id_bytes)])
    assert all(o is not None and o.status is ChunkStatus.LOCAL and o.reason == "reducer timeout"
               for o in receiver.outcomes(span))
    header, payload = result_from(C, chunks[0], np.full(chunks[0].size, 5.0))
    assert receiver.on_result(C.peer_id_bytes, header, payload, 11.0) is None
    assert np.all(buffer == 0.0)
    assert [(e.peer, e.role) for e in ledger.excluded] == [(C.peer_id_bytes, "reducer")]


def test_a_refused_result_leaves_only_its_own_chunk_local() -> None:
    receiver, _, _ = make_receiver()
    span = SPEC.index_of(B.peer_id_bytes)
    chunks = span_chunks()[span]
    header, payload = result_from(B, chunks[1], np.zeros(chunks[1].size),
                                  contributors=(A.peer_id_bytes, B.peer_id_bytes))
    bad = dataclasses.replace(header, weights=(1.0, 1.0)).signed_with(B.sign)
    refusal = receiver.on_result(B.peer_id_bytes, bad, payload, 1.0)
    assert isinstance(refusal, Refusal) and refusal.settle
    receiver.settle_refused(B.peer_id_bytes, bad, refusal.detail)
    outcomes = receiver.outcomes(span)
    assert outcomes[1] is not None and outcomes[1].status is ChunkStatus.LOCAL
    assert outcomes[1].reason.startswith("invalid result: contributor weights")
    assert all(o is None for i, o in enumerate(outcomes) if i != 1)
    # A result naming no chunk of ours settles nothing.
    stray = dataclasses.replace(header, chunk_index=99).signed_with(B.sign)
    receiver.settle_refused(B.peer_id_bytes, stray, "stray")
    assert receiver.outcomes(span) == outcomes


@pytest.mark.parametrize("send_kind", ["chunk", "result", "reject"])
def test_a_send_names_its_frame(send_kind: str) -> None:
    send = Send(B.peer_id_bytes, send_kind, 1, 2, lambda: [b"ab", b"cd"])  # type: ignore[arg-type]
    assert send.frame() == b"abcd" and send_kind in repr(send)
