"""One peer's butterfly all-reduce for one round, as a sans-IO state machine.

Every member owns one span of the flat vector (partition.py) and reduces it: the others
stream it their slice of that span chunk by chunk, it aggregates each chunk once every
expected sender's contribution is in, signs the result and sends it to every other member,
who writes it into its buffer. The machine does no I/O and reads no clock: the caller feeds it
frames (``on_frame``), transport failures (``on_peer_failed``) and the passage of time
(``tick``), each with ``now``, and delivers the ``Send`` objects each call returns.

Who is waited for, and for how long:

* A sender is awaited by a reducer until ``chunk_timeout`` seconds pass without a valid chunk
  from it. It is then excluded from every chunk of the span not yet complete, all at once, so
  a dead sender costs one timeout per round rather than one per chunk. Contributions it had
  already delivered stay in. A sender that breaks the protocol is excluded at once, the same
  way; a transport failure (``on_peer_failed``) likewise.
* A reducer is awaited until ``result_timeout`` seconds pass without a valid result from it;
  the chunks of its span still missing then stay at local values. Late results are not
  applied afterwards: the report says which chunks were averaged, and that must stay true.

Results go to every member except the reducer itself and peers reported failed, including
members whose contribution was excluded: every live member then holds the same values for
every span whose reducer lived, whoever was counted in it.

What is checked on every frame, and what it costs the peer, is in protocol/averaging.md
sections 7 and 8; ``score_events`` collects the events for the caller's ``ScoreBook``.

``AllReducePeer`` is the one entry point and coordinates the roles, each in its own module:
``admission`` (the checks every frame passes first), ``span_reducer`` (our span, as its
reducer), ``result_receiver`` (the other spans' results), ``ledger`` (exclusions, score
events, violations, bytes) and ``sends`` (the frames going out).
"""

from __future__ import annotations

import math

import numpy as np

from dandelion_p2p.averaging.admission import Admission, Refusal
from dandelion_p2p.averaging.aggregation import DEFAULT_ITERATIONS, DEFAULT_OUTLIER_RATIO
from dandelion_p2p.averaging.compression import CODECS, BufferErrorFeedback, Codec, get_codec
from dandelion_p2p.averaging.equivocation import EchoExchange
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.ledger import RoundLedger
from dandelion_p2p.averaging.messages import (
    FRAME_PREFIX,
    MAX_FRAME,
    MAX_HEADER,
    Buffer,
    ChunkHeader,
    ResultEcho,
    ResultHeader,
    Signer,
    unpack_frame,
)
from dandelion_p2p.averaging.partition import Chunk, Partition, split_chunks
from dandelion_p2p.averaging.report import (
    ChunkOutcome,
    ChunkStatus,
    ExclusionReason,
    RoundReport,
    SpanOutcome,
)
from dandelion_p2p.averaging.result_receiver import ResultReceiver
from dandelion_p2p.averaging.sends import Framer, Send
from dandelion_p2p.averaging.span_reducer import FloatArray, Mode, SpanReducer
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.runconfig.schema import DEFAULT_CHUNK_TIMEOUT
from dandelion_p2p.wire import Reject, RejectCode, encode

MODES: tuple[Mode, ...] = ("mean", "centered_clip")
DEFAULT_MAX_CHUNK = 1 << 20


class AllReducePeer:
    """One member's state machine for one all-reduce round.

    ``buffer`` is this peer's flat float32 vector; it is read for the chunks sent and written
    in place, span-chunk by span-chunk, only when a result is applied (including this peer's
    own results). The caller must not modify it during the round.

    Raises ``ValueError`` for invalid local arguments: a peer not in the group, a buffer that
    is not a writable, contiguous, 1-D float32 array of finite values, a weight other than the
    one in the group spec, an unknown codec or mode, a chunk size below the partition block or
    whose frames would exceed the frame limit, a non-positive timeout.
    """

    def __init__(
        self,
        *,
        peer_id: bytes,
        sign: Signer,
        spec: GroupSpec,
        buffer: FloatArray,
        weight: float | None = None,
        codec: str = "none",
        max_chunk: int = DEFAULT_MAX_CHUNK,
        mode: Mode = "mean",
        chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT,
        result_timeout: float | None = None,
        clip_iterations: int = DEFAULT_ITERATIONS,
        outlier_ratio: float = DEFAULT_OUTLIER_RATIO,
        error_feedback: BufferErrorFeedback | None = None,
    ) -> None:
        _check_arguments(
            peer_id=peer_id,
            spec=spec,
            buffer=buffer,
            weight=weight,
            codec=codec,
            max_chunk=max_chunk,
            mode=mode,
            chunk_timeout=chunk_timeout,
            result_timeout=result_timeout,
            clip_iterations=clip_iterations,
            outlier_ratio=outlier_ratio,
            error_feedback=error_feedback,
        )
        self.peer_id = peer_id
        self.spec = spec
        self.mode: Mode = mode
        self.max_chunk = max_chunk
        self.chunk_timeout = chunk_timeout
        self.result_timeout = 2.0 * chunk_timeout if result_timeout is None else result_timeout
        self._codec: Codec = get_codec(codec)
        self._buffer = buffer

        self.partition: Partition = spec.partition(buffer.size)
        self._span_chunks: tuple[tuple[Chunk, ...], ...] = tuple(
            split_chunks(s.start, s.end, max_chunk, spec.block_size) for s in self.partition.spans
        )
        self._me = spec.index_of(peer_id)
        self._others = tuple(p for p in spec.peer_ids if p != peer_id)
        self._ledger = RoundLedger()
        self._admission = Admission(spec)
        self._framer = Framer(
            peer_id=peer_id,
            sign=sign,
            spec=spec,
            codec=self._codec,
            buffer=buffer,
            error_feedback=error_feedback,
            count_sent=self._ledger.count_sent,
        )
        self._reducer = SpanReducer(
            peer_id=peer_id,
            spec=spec,
            span_index=self._me,
            chunks=self._span_chunks[self._me],
            buffer=buffer,
            codec=self._codec,
            mode=mode,
            max_chunk=max_chunk,
            clip_iterations=clip_iterations,
            outlier_ratio=outlier_ratio,
            error_feedback=error_feedback,
            ledger=self._ledger,
            framer=self._framer,
        )
        self._receiver = ResultReceiver(
            spec=spec,
            partition=self.partition,
            span_chunks=self._span_chunks,
            my_span=self._me,
            buffer=buffer,
            codec=self._codec,
            ledger=self._ledger,
        )
        self._echoes = EchoExchange(spec, self.partition, peer_id)
        self._outbox: list[Send] = []
        self._settled_at: float | None = None
        """When every result was settled and our final echo went out."""
        self._t0: float | None = None
        self._started_at: float | None = None
        self._finished_at: float | None = None

    @property
    def bytes_moved(self) -> tuple[int, int]:
        """(sent, received) so far this round, frames and headers included."""
        return self._ledger.bytes_sent, self._ledger.bytes_received

    # ----------------------------------------------------------------------------- inputs

    def start(self, now: float) -> list[Send]:
        """Begin the round: the chunks of our vector for every other reducer, interleaved by
        chunk index. Our own span's chunks are contributed locally.

        Raises ``RuntimeError`` when called twice (a local bug).
        """
        return self._start(now) + self._drain()

    def _start(self, now: float) -> list[Send]:
        if self._started_at is not None:
            raise RuntimeError("round already started")
        self._touch(now)
        self._started_at = now
        sends = self._reducer.finish_ready()
        queues = []
        for si, chunks in enumerate(self._span_chunks):
            reducer = self.partition.spans[si].peer_id
            if si != self._me and chunks and reducer not in self._ledger.gone:
                queues.append([self._framer.chunk(si, c, reducer) for c in chunks])
        for k in range(max((len(q) for q in queues), default=0)):
            sends.extend(q[k] for q in queues if k < len(q))
        self._maybe_done(now)
        return sends

    def on_frame(self, sender: bytes, frame: Buffer, now: float) -> list[Send]:
        """Handle one complete frame from ``sender`` (the authenticated peer at the other end
        of the transport). Never raises for anything in the frame: a bad frame is refused,
        scored and answered with a ``Reject``. Nothing pointing into ``frame`` is kept after
        the call, so the caller may reuse its memory for the next frame."""
        return self._on_frame(sender, frame, now) + self._drain()

    def _on_frame(self, sender: bytes, frame: Buffer, now: float) -> list[Send]:
        self._touch(now)
        self._ledger.count_received(memoryview(frame).nbytes)
        try:
            header, payload = unpack_frame(frame)
        except ProtocolViolation as exc:
            return self._refuse(sender, Refusal(exc.code, exc.detail, exclude=True), now)
        if isinstance(header, Reject):
            self._ledger.record_reject(sender, header.code, header.detail, now)
            if header.code == RejectCode.OTHER_GROUP:
                # Said by the member itself: given up now rather than at the chunk timeout.
                return self._give_up_another_view(sender, now, header.detail)
            return []
        if isinstance(header, ResultEcho):
            return self._on_echo(sender, header, payload, now)
        assert isinstance(header, ChunkHeader | ResultHeader)  # unpack_frame admits no other
        refusal = self._admission.check(sender, header)
        if refusal is not None:
            return self._refuse(sender, refusal, now, header)
        if isinstance(header, ChunkHeader):
            outcome = self._reducer.on_chunk(sender, header, payload, now)
            if isinstance(outcome, Refusal):
                return self._refuse(sender, outcome, now, header)
            self._maybe_done(now)
            return outcome
        again = self._receiver.applied(sender, header)  # a copy resent over a new channel
        refused = self._receiver.on_result(sender, header, payload, now)
        if refused is not None:
            return self._refuse(sender, refused, now, header)
        sends: list[Send] = []
        if not again and self._receiver.applied(sender, header):
            # Every member tells the others what the reducer sent it: a reducer that sent
            # members different results is caught by all of them within the round.
            others = [p for p in self._others if p != sender and p not in self._ledger.gone]
            sends = self._framer.echoes(encode(header), others)
            caught = self._echoes.observe(header)
            if caught is not None:
                sends += self._equivocated(caught, now)
        self._maybe_done(now)
        return sends

    def on_peer_failed(self, peer: bytes, now: float, reason: str = "") -> list[Send]:
        """The transport lost ``peer`` (connection dead, stream stalled): stop waiting for
        it in both roles and stop sending it results."""
        return self._on_peer_failed(peer, now, reason) + self._drain()

    def _on_peer_failed(self, peer: bytes, now: float, reason: str = "") -> list[Send]:
        self._touch(now)
        if peer not in self.spec or peer == self.peer_id:
            return []
        # Only what it still owed in a role it was still counted in; a peer already out
        # for misbehaving has been scored for that.
        owed = self._reducer.owes(peer) or self._receiver.owes(peer)
        sends = self._fail(peer, ExclusionReason.FAILED, now, reason or "transport failure")
        if owed:
            self._ledger.score_timeout(peer)
        self._maybe_done(now)
        return sends

    def wants_link(self, peer: bytes) -> bool:
        """Whether the round still needs a channel to ``peer``: it is not over and the peer
        is still part of it (a transport worth reopening when the channel is lost)."""
        return not self.done and peer in self.spec and peer not in self._ledger.gone

    def resend(self, peer: bytes, written: list[Send]) -> list[Send]:
        """Of the frames ``written`` to ``peer`` on a channel that was lost, those it may
        still need, to write again on a new channel (``Send.again``): chunks whose result we
        do not hold yet, results while it has not said it holds every result (its final
        echo), and echoes. Rejects are not repeated. The receiver drops what it already got
        (protocol/averaging.md section 14.2)."""
        if not self.wants_link(peer):
            return []
        settled_everything = peer not in self._echoes.awaited
        out = []
        for send in written:
            if send.kind == "chunk":
                if not self._receiver.settled(send.span_index, send.chunk_index):
                    out.append(send)
            elif send.kind == "result":
                if not settled_everything:
                    out.append(send)
            elif send.kind == "echo":
                out.append(send)
        return out

    def leave_out(self, peer: bytes, now: float, reason: ExclusionReason,
                  detail: str) -> list[Send]:
        """Leave out a member the group kept: one this peer has banned (most members have
        not), or one that reduces no span and has no channel to this peer (the others may
        have one). None of its chunks count here and none of ours go to it. Not scored: a
        ban is the score's doing, and a missing channel need not be the member's."""
        self._touch(now)
        sends: list[Send] = []
        if peer in self.spec and peer != self.peer_id:
            sends = self._fail(peer, reason, now, detail)
            self._maybe_done(now)
        return sends + self._drain()

    def tick(self, now: float) -> list[Send]:
        """Apply the timeouts due at ``now``; call it at ``next_deadline`` (or periodically)."""
        return self._tick(now) + self._drain()

    def _tick(self, now: float) -> list[Send]:
        since = self._touch(now)
        sends: list[Send] = []
        late = self._reducer.late_senders(now, since, self.chunk_timeout)
        for sender in late:
            self._reducer.exclude_sender(sender, ExclusionReason.TIMEOUT, now, "no chunk in time")
            self._ledger.score_timeout(sender)
        if late:
            sends.extend(self._reducer.finish_ready())
            self._maybe_done(now)
        if self._settled_at is not None and now - self._settled_at >= self.result_timeout:
            self._echoes.awaited.clear()  # members silent this long compare nothing more
        for reducer in self._receiver.overdue(now, since, self.result_timeout):
            self._receiver.abandon(reducer, ExclusionReason.TIMEOUT, now, "no result in time")
            self._maybe_done(now)
            self._ledger.score_timeout(reducer)
        self._maybe_done(now)
        return sends

    # ---------------------------------------------------------------------------- outputs

    @property
    def done(self) -> bool:
        """Every chunk of every span is settled: reduced by us, applied, or left local."""
        return self._finished_at is not None

    @property
    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which ``tick`` has something to do; None when done or
        before any input."""
        if self.done or self._t0 is None:
            return None
        deadlines = self._reducer.deadlines(self._t0, self.chunk_timeout)
        deadlines += self._receiver.deadlines(self._t0, self.result_timeout)
        if self._settled_at is not None and self._awaited_echoes():
            deadlines.append(self._settled_at + self.result_timeout)
        return min(deadlines, default=None)

    @property
    def in_progress(self) -> int:
        """Chunks of our span holding contributions in memory: a transport may stop reading
        from the fastest senders while this is high, bounding a reducer's memory."""
        return self._reducer.in_progress

    @property
    def score_events(self) -> list[tuple[bytes, ScoreEvent]]:
        """Events so far, for ``ScoreBook.record``; successes are added when the round ends."""
        return self._ledger.events

    def report(self) -> RoundReport:
        spans = []
        for si, span in enumerate(self.partition.spans):
            chunks = self._span_chunks[si]
            outcomes = self._reducer.outcomes if si == self._me else self._receiver.outcomes(si)
            spans.append(
                SpanOutcome(
                    si,
                    span.peer_id,
                    span.start,
                    span.end,
                    tuple(
                        o if o is not None else ChunkOutcome(c.index, c.start, c.end, _PENDING)
                        for c, o in zip(chunks, outcomes, strict=True)
                    ),
                )
            )
        ledger = self._ledger
        return RoundReport(
            run=self.spec.run,
            round=self.spec.round,
            group_id=self.spec.group_id,
            peer=self.peer_id,
            members=self.spec.peer_ids,
            reducers=self.partition.reducers,
            n_elements=self._buffer.size,
            codec=self._codec.name,
            mode=self.mode,
            spans=tuple(spans),
            excluded=ledger.excluded,
            violations=ledger.violations,
            violations_dropped=ledger.violations_dropped,
            rejects_received=ledger.rejects_received,
            bytes_sent=ledger.bytes_sent,
            bytes_received=ledger.bytes_received,
            started_at=self._started_at,
            finished_at=self._finished_at,
            equivocation_proofs=tuple(encode(p) for p in self._echoes.proofs.values()),
        )

    # ------------------------------------------------------------- refusals and failures

    def _refuse(
        self,
        peer: bytes,
        refusal: Refusal,
        now: float,
        header: ChunkHeader | ResultHeader | None = None,
    ) -> list[Send]:
        """Record, score and answer a refused frame, with the consequence ``refusal`` names
        for the round."""
        if refusal.other_group:
            return self._group_mismatch(peer, refusal, now)
        self._ledger.record_violation(peer, refusal.code, refusal.detail, now)
        self._ledger.event(peer, refusal.event)
        sends: list[Send] = []
        if refusal.exclude and peer in self.spec and peer != self.peer_id:
            reason = (
                ExclusionReason.BAD_SIGNATURE
                if refusal.event is ScoreEvent.BAD_SIGNATURE
                else ExclusionReason.MALFORMED
            )
            if self._reducer.exclude_sender(peer, reason, now, refusal.detail):
                sends.extend(self._reducer.finish_ready())
                self._maybe_done(now)
        sends.append(self._framer.reject(peer, refusal.code, refusal.detail))
        if refusal.settle and isinstance(header, ResultHeader):
            self._receiver.settle_refused(peer, header, refusal.detail)
            self._maybe_done(now)
        return sends

    def _group_mismatch(self, peer: bytes, refusal: Refusal, now: float) -> list[Send]:
        # Not scored (see Refusal.other_group).
        self._ledger.record_violation(peer, refusal.code, refusal.detail, now)
        sends = self._give_up_another_view(peer, now, refusal.detail)
        sends.append(self._framer.reject(peer, refusal.code, refusal.detail))
        return sends

    def _give_up_another_view(self, peer: bytes, now: float, detail: str) -> list[Send]:
        """``peer`` laid the round out otherwise (it left out someone we did not, or we it):
        it will send nothing of our layout, so it is given up in every role, and not
        remembered as failed (reason ``group_mismatch``)."""
        if peer not in self.spec or peer == self.peer_id:
            return []
        return self._fail(peer, ExclusionReason.GROUP_MISMATCH, now, detail)

    def _fail(self, peer: bytes, reason: ExclusionReason, now: float, detail: str) -> list[Send]:
        """Give ``peer`` up in both roles and send it nothing more this round."""
        self._ledger.gone.add(peer)
        sends: list[Send] = []
        if self._reducer.exclude_sender(peer, reason, now, detail):
            sends = self._reducer.finish_ready()
            self._maybe_done(now)
        self._receiver.abandon(peer, reason, now, detail)
        self._maybe_done(now)
        return sends

    # --------------------------------------------------------------------------- echoes

    def _on_echo(
        self, sender: bytes, echo: ResultEcho, payload: memoryview, now: float
    ) -> list[Send]:
        if sender not in self.spec or sender == self.peer_id:
            return self._refuse(
                sender, Refusal(RejectCode.FORBIDDEN, "echo from a non-member"), now
            )
        if self.done:
            return []  # the report is written; a late proof cannot change what it says
        outcome = self._echoes.on_echo(sender, echo, payload)
        if isinstance(outcome, Refusal):
            return self._refuse(sender, outcome, now)
        sends = [] if outcome is None else self._equivocated(outcome, now)
        self._maybe_done(now)
        return sends

    def _equivocated(self, reducer: bytes, now: float) -> list[Send]:
        """``reducer`` signed two results for one chunk: its span goes back to local values
        here, as on every member that compares, and it is out of the round."""
        self._ledger.event(reducer, ScoreEvent.EQUIVOCATION)
        detail = "signed different results for one chunk"
        self._receiver.revert(reducer, now, detail)
        return self._fail(reducer, ExclusionReason.EQUIVOCATION, now, detail)

    def _awaited_echoes(self) -> bool:
        gone = self._ledger.gone
        return any(p not in gone and not self._ledger.was_excluded(p) for p in self._echoes.awaited)

    def _drain(self) -> list[Send]:
        sends, self._outbox = self._outbox, []
        return sends

    # ------------------------------------------------------------------------ bookkeeping

    def _touch(self, now: float) -> float:
        """Check ``now``; the time of the round's first input, which every timeout counts
        from until the peer in question sends something valid."""
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        if self._t0 is None:
            self._t0 = now
        return self._t0

    def _maybe_done(self, now: float) -> None:
        """End the round once every chunk is settled, and score each member that delivered
        everything it owed us, in every role it had, without a fault."""
        if self._finished_at is not None or self._started_at is None:
            return
        if self._reducer.open_chunks or self._receiver.unsettled_chunks:
            return
        if self._settled_at is None:
            self._settled_at = now
            live = [p for p in self._others if p not in self._ledger.gone]
            self._outbox += self._framer.echoes(b"", live)
        if self._awaited_echoes():
            return
        self._finished_at = now
        self._reducer.release()
        self._receiver.release()
        for peer in self._others:
            owed_chunks = self._reducer.has_chunks
            owed_results = self._receiver.expects_results_from(peer)
            if not (owed_chunks or owed_results) or self._ledger.was_penalized(peer):
                continue
            if self._ledger.was_excluded(peer):
                continue
            chunks_ok = not owed_chunks or self._reducer.delivered_all(peer)
            results_ok = not owed_results or self._receiver.applied_all(peer)
            if chunks_ok and results_ok:
                self._ledger.event(peer, ScoreEvent.SUCCESS)


_PENDING = ChunkStatus.PENDING


def _check_arguments(
    *,
    peer_id: bytes,
    spec: GroupSpec,
    buffer: FloatArray,
    weight: float | None,
    codec: str,
    max_chunk: int,
    mode: Mode,
    chunk_timeout: float,
    result_timeout: float | None,
    clip_iterations: int,
    outlier_ratio: float,
    error_feedback: BufferErrorFeedback | None,
) -> None:
    """Raise ``ValueError`` for the local mistakes ``AllReducePeer`` lists."""
    if peer_id not in spec:
        raise ValueError("peer_id is not a member of the group")
    if not (
        isinstance(buffer, np.ndarray)
        and buffer.dtype == np.float32
        and buffer.ndim == 1
        and buffer.flags.c_contiguous
        and buffer.flags.writeable
    ):
        raise ValueError("buffer must be a writable, C-contiguous, 1-D float32 array")
    if buffer.size == 0:
        raise ValueError("buffer is empty")
    if not (math.isfinite(float(buffer.min())) and math.isfinite(float(buffer.max()))):
        # A diverged trainer: a local bug, never something to send to others.
        raise ValueError("buffer holds NaN or infinity")
    member = spec.member(peer_id)
    if weight is not None and weight != member.weight:
        raise ValueError(f"weight {weight} differs from the group spec's {member.weight}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_chunk < spec.block_size:
        raise ValueError(f"max_chunk ({max_chunk}) is below the block size {spec.block_size}")
    if FRAME_PREFIX.size + MAX_HEADER + get_codec(codec).encoded_size(max_chunk) > MAX_FRAME:
        raise ValueError(f"max_chunk {max_chunk} makes frames above {MAX_FRAME} bytes")
    if clip_iterations < 0:
        raise ValueError(f"clip_iterations must be >= 0, got {clip_iterations}")
    if not (math.isfinite(outlier_ratio) and outlier_ratio > 0.0):
        raise ValueError(f"outlier_ratio must be finite and > 0, got {outlier_ratio!r}")
    if result_timeout is None:
        result_timeout = 2.0 * chunk_timeout
    for name, value in (("chunk_timeout", chunk_timeout), ("result_timeout", result_timeout)):
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if error_feedback is not None and (
        error_feedback.codec.name != codec or error_feedback.size != buffer.size
    ):
        raise ValueError("error feedback must use the round's codec and the buffer's size")
