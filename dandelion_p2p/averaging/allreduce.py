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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.averaging.aggregation import (
    DEFAULT_ITERATIONS,
    DEFAULT_OUTLIER_RATIO,
    Contribution,
    centered_clip,
)
from dandelion_p2p.averaging.compression import CODECS, BufferErrorFeedback, Codec, get_codec
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.messages import (
    FRAME_PREFIX,
    MAX_FRAME,
    MAX_HEADER,
    Buffer,
    ChunkHeader,
    ResultHeader,
    Signer,
    chunk_signing_payload,
    frame_size,
    pack_frame,
    payload_digest,
    result_signing_payload,
    unpack_frame,
)
from dandelion_p2p.averaging.partition import Chunk, Partition, split_chunks
from dandelion_p2p.averaging.report import (
    ChunkOutcome,
    ChunkStatus,
    ExcludedPeer,
    ExclusionReason,
    Role,
    RoundReport,
    SpanOutcome,
    Violation,
)
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import public_key_of, verify
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import Reject, RejectCode

Mode = Literal["mean", "centered_clip"]
MODES: tuple[Mode, ...] = ("mean", "centered_clip")
SendKind = Literal["chunk", "result", "reject"]

DEFAULT_MAX_CHUNK = 1 << 20
DEFAULT_CHUNK_TIMEOUT = 30.0
MAX_REPORTED_VIOLATIONS = 256
_SCRATCH = 1 << 15
# Float64 sums of finished chunks kept for reuse; more only exist while more chunks are open.
_MAX_FREE_SUMS = 4

FloatArray = NDArray[np.float32]


class Send:
    """One frame for the transport to deliver to ``recipient``, in the order returned.

    Chunk frames are rendered (encoded, digested, signed) only when ``buffers()`` or
    ``frame()`` is called, so that a round over a multi-GB vector does not hold an encoded
    copy of it while the transport works through the queue: render each frame just before
    writing it, once. Result frames are rendered when the chunk is reduced and shared among
    their recipients.
    """

    __slots__ = ("_render", "chunk_index", "kind", "recipient", "span_index")

    def __init__(
        self,
        recipient: bytes,
        kind: SendKind,
        span_index: int,
        chunk_index: int,
        render: Callable[[], list[Buffer]],
    ) -> None:
        self.recipient = recipient
        self.kind = kind
        self.span_index = span_index
        self.chunk_index = chunk_index
        self._render = render

    def buffers(self) -> list[Buffer]:
        """The frame as buffers for a vectored write (see ``messages.pack_frame``)."""
        return self._render()

    def frame(self) -> bytes:
        """The frame as one bytes object (a copy of the payload)."""
        return b"".join(self._render())

    def __repr__(self) -> str:
        return (
            f"Send({self.kind}, to={self.recipient[-4:].hex()}, span={self.span_index}, "
            f"chunk={self.chunk_index})"
        )


@dataclass(slots=True)
class _Reduction:
    """A chunk of our span in progress: what has arrived so far."""

    senders: set[bytes] = field(default_factory=set)
    acc: NDArray[np.float64] | None = None
    values: dict[bytes, FloatArray] = field(default_factory=dict)


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
        self._codec: Codec = get_codec(codec)
        if FRAME_PREFIX.size + MAX_HEADER + self._codec.encoded_size(max_chunk) > MAX_FRAME:
            raise ValueError(f"max_chunk {max_chunk} makes frames above {MAX_FRAME} bytes")
        if clip_iterations < 0:
            raise ValueError(f"clip_iterations must be >= 0, got {clip_iterations}")
        if not (math.isfinite(outlier_ratio) and outlier_ratio > 0.0):
            raise ValueError(f"outlier_ratio must be finite and > 0, got {outlier_ratio!r}")
        result_timeout = 2.0 * chunk_timeout if result_timeout is None else result_timeout
        for name, value in (("chunk_timeout", chunk_timeout), ("result_timeout", result_timeout)):
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")

        self.peer_id = peer_id
        self.spec = spec
        self.mode: Mode = mode
        if error_feedback is not None and (
            error_feedback.codec.name != codec or error_feedback.size != buffer.size
        ):
            raise ValueError("error feedback must use the round's codec and the buffer's size")
        self._error_feedback = error_feedback
        self.max_chunk = max_chunk
        self.chunk_timeout = chunk_timeout
        self.result_timeout = result_timeout
        self._sign = sign
        self._buffer = buffer
        self._clip_iterations = clip_iterations
        self._outlier_ratio = outlier_ratio

        self.partition: Partition = spec.partition(buffer.size)
        spans = self.partition.spans
        self._span_chunks: tuple[tuple[Chunk, ...], ...] = tuple(
            split_chunks(s.start, s.end, max_chunk, spec.block_size) for s in spans
        )
        self._me = spec.index_of(peer_id)
        self._my_chunks = self._span_chunks[self._me]
        self._others = tuple(p for p in spec.peer_ids if p != peer_id)
        max_weight = max(m.weight for m in spec.members)
        # Shares relative to the heaviest member keep the float64 running sum finite whatever
        # the announced weights.
        self._share = {m.peer_id: m.weight / max_weight for m in spec.members}
        self._keys: dict[bytes, bytes | None] = {}

        # Our span, as its reducer.
        self._reductions: dict[int, _Reduction] = {}
        self._mine: list[ChunkOutcome | None] = [None] * len(self._my_chunks)
        self._open: set[int] = set(range(len(self._my_chunks)))
        self._live_senders: set[bytes] = set(self._others) if self._my_chunks else set()
        self._delivered: dict[bytes, int] = dict.fromkeys(self._others, 0)
        self._sender_progress: dict[bytes, float] = {}
        self._scratch: NDArray[np.float64] | None = None

        # Other spans, as a receiver of results.
        self._results: dict[int, list[ChunkOutcome | None]] = {
            i: [None] * len(chunks)
            for i, chunks in enumerate(self._span_chunks)
            if i != self._me and chunks
        }
        self._unsettled: dict[int, int] = {i: len(v) for i, v in self._results.items()}
        self._reducer_progress: dict[bytes, float] = {}
        self._pending = len(self._open) + sum(self._unsettled.values())

        self._gone: set[bytes] = set()
        self._excluded: list[ExcludedPeer] = []
        self._excluded_roles: set[tuple[bytes, Role]] = set()
        self._events: list[tuple[bytes, ScoreEvent]] = []
        self._penalized: set[bytes] = set()
        self._timeout_scored: set[bytes] = set()
        self._violations: list[Violation] = []
        self._violations_dropped = 0
        self._rejects_received: list[Violation] = []
        self._bytes_sent = 0
        self._bytes_received = 0
        self._free_sums: list[NDArray[np.float64]] = []
        self._t0: float | None = None
        self._started_at: float | None = None
        self._finished_at: float | None = None

    @property
    def bytes_moved(self) -> tuple[int, int]:
        """(sent, received) so far this round, frames and headers included."""
        return self._bytes_sent, self._bytes_received

    # ----------------------------------------------------------------------------- inputs

    def start(self, now: float) -> list[Send]:
        """Begin the round: the chunks of our vector for every other reducer, interleaved by
        chunk index. Our own span's chunks are contributed locally.

        Raises ``RuntimeError`` when called twice (a local bug).
        """
        if self._started_at is not None:
            raise RuntimeError("round already started")
        self._touch(now)
        self._started_at = now
        sends = self._finish_ready(now)
        queues = [
            [self._chunk_send(si, c) for c in chunks]
            for si, chunks in enumerate(self._span_chunks)
            if si != self._me and chunks and self.partition.spans[si].peer_id not in self._gone
        ]
        for k in range(max((len(q) for q in queues), default=0)):
            sends.extend(q[k] for q in queues if k < len(q))
        self._maybe_done(now)
        return sends

    def on_frame(self, sender: bytes, frame: Buffer, now: float) -> list[Send]:
        """Handle one complete frame from ``sender`` (the authenticated peer at the other end
        of the transport). Never raises for anything in the frame: a bad frame is refused,
        scored and answered with a ``Reject``. Nothing pointing into ``frame`` is kept after
        the call, so the caller may reuse its memory for the next frame."""
        self._touch(now)
        self._bytes_received += memoryview(frame).nbytes
        try:
            header, payload = unpack_frame(frame)
        except ProtocolViolation as exc:
            return self._violation(sender, exc.code, exc.detail, ScoreEvent.MALFORMED, now, True)
        if isinstance(header, ChunkHeader):
            return self._on_chunk(sender, header, payload, now)
        if isinstance(header, ResultHeader):
            return self._on_result(sender, header, payload, now)
        assert isinstance(header, Reject)  # unpack_frame admits nothing else
        if len(self._rejects_received) < MAX_REPORTED_VIOLATIONS:
            name = _code_name(header.code)
            self._rejects_received.append(Violation(sender, name, header.detail, now))
        return []

    def on_peer_failed(self, peer: bytes, now: float, reason: str = "") -> list[Send]:
        """The transport lost ``peer`` (connection dead, stream stalled): stop waiting for
        it in both roles and stop sending it results."""
        self._touch(now)
        if peer not in self.spec or peer == self.peer_id:
            return []
        # Only what it still owed in a role it was still counted in; a peer already out
        # for misbehaving has been scored for that.
        owed = (peer in self._live_senders and self._owes_chunks(peer)) or self._owes_results(peer)
        sends = self._fail(peer, ExclusionReason.FAILED, now, reason or "transport failure")
        if owed:
            self._score_timeout(peer)
        self._maybe_done(now)
        return sends

    def exclude_banned(self, peer: bytes, now: float) -> list[Send]:
        """Leave out a member this peer has banned (the group kept it, since most members
        have not): none of its chunks count here and none of ours go to it. Not scored
        again: the ban is the score's doing."""
        self._touch(now)
        if peer not in self.spec or peer == self.peer_id:
            return []
        sends = self._fail(peer, ExclusionReason.BANNED, now, "banned by this peer")
        self._maybe_done(now)
        return sends

    def tick(self, now: float) -> list[Send]:
        """Apply the timeouts due at ``now``; call it at ``next_deadline`` (or periodically)."""
        self._touch(now)
        sends: list[Send] = []
        if self._open:
            late = [
                s
                for s in sorted(self._live_senders)
                if self._owes_chunks(s) and now - self._progress(s, True) >= self.chunk_timeout
            ]
            for s in late:
                self._exclude_sender(s, ExclusionReason.TIMEOUT, now, "no chunk in time")
                self._score_timeout(s)
            if late:
                sends.extend(self._finish_ready(now))
        for si in sorted(self._unsettled):
            reducer = self.partition.spans[si].peer_id
            if self._unsettled[si] and now - self._progress(reducer, False) >= self.result_timeout:
                self._abandon_reducer(reducer, ExclusionReason.TIMEOUT, now, "no result in time")
                self._score_timeout(reducer)
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
        deadlines = [
            self._progress(s, True) + self.chunk_timeout
            for s in self._live_senders
            if self._open and self._owes_chunks(s)
        ]
        deadlines += [
            self._progress(self.partition.spans[si].peer_id, False) + self.result_timeout
            for si, left in self._unsettled.items()
            if left
        ]
        return min(deadlines, default=None)

    @property
    def in_progress(self) -> int:
        """Chunks of our span holding contributions in memory: a transport may stop reading
        from the fastest senders while this is high, bounding a reducer's memory."""
        return len(self._reductions)

    @property
    def score_events(self) -> list[tuple[bytes, ScoreEvent]]:
        """Events so far, for ``ScoreBook.record``; successes are added when the round ends."""
        return list(self._events)

    def report(self) -> RoundReport:
        spans = []
        for si, span in enumerate(self.partition.spans):
            chunks = self._span_chunks[si]
            outcomes = self._mine if si == self._me else self._results.get(si, [])
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
            excluded=tuple(self._excluded),
            violations=tuple(self._violations),
            violations_dropped=self._violations_dropped,
            rejects_received=tuple(self._rejects_received),
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            started_at=self._started_at,
            finished_at=self._finished_at,
        )

    # ------------------------------------------------------------------------ our span

    def _on_chunk(
        self, sender: bytes, h: ChunkHeader, payload: memoryview, now: float
    ) -> list[Send]:
        def bad(
            code: RejectCode, detail: str, event: ScoreEvent = ScoreEvent.MALFORMED
        ) -> list[Send]:
            return self._violation(sender, code, detail, event, now, True)

        if h.sender != sender:
            return bad(RejectCode.FORBIDDEN, "chunk signed as another peer")
        if not self._verify(sender, h.signing_payload(), h.signature):
            return bad(RejectCode.BAD_SIGNATURE, "chunk signature", ScoreEvent.BAD_SIGNATURE)
        if h.run != self.spec.run or h.round != self.spec.round:
            # A replay (or a frame of another round routed here): it says nothing about this
            # round's chunks, so the sender stays in.
            return self._violation(
                sender,
                RejectCode.UNEXPECTED,
                f"chunk of round {h.round}",
                ScoreEvent.MALFORMED,
                now,
                False,
            )
        if h.group_id != self.spec.group_id:
            return self._group_mismatch(sender, now)
        if sender not in self.spec:
            return bad(RejectCode.FORBIDDEN, "sender is not a member")
        if h.recipient != self.peer_id:
            return bad(RejectCode.INVALID_FIELD, "chunk addressed to another peer")
        if h.span_index != self._me:
            return bad(RejectCode.INVALID_FIELD, f"span {h.span_index} is not reduced here")
        if h.chunk_index >= len(self._my_chunks):
            return bad(RejectCode.INVALID_FIELD, f"no chunk {h.chunk_index} in this span")
        chunk = self._my_chunks[h.chunk_index]
        if (h.start, h.end) != (chunk.start, chunk.end):
            return bad(RejectCode.INVALID_FIELD, "chunk range does not match the layout")
        if h.codec != self._codec.name:
            return bad(RejectCode.INVALID_FIELD, f"codec {h.codec!r}, the run uses another")
        if h.weight != self.spec.member(sender).weight:
            return bad(RejectCode.INVALID_FIELD, "weight differs from the announced one")
        if payload.nbytes != self._codec.encoded_size(chunk.size):
            return bad(RejectCode.INVALID_FIELD, "payload length does not match the range")
        if sender not in self._live_senders:
            return []  # excluded already (late, failed or misbehaved): ignored, not scored again
        reduction = self._reductions.get(chunk.index)
        if self._mine[chunk.index] is not None or (
            reduction is not None and sender in reduction.senders
        ):
            return self._violation(
                sender, RejectCode.UNEXPECTED, "duplicate chunk", ScoreEvent.MALFORMED, now, False
            )
        if payload_digest(payload) != h.digest:
            return bad(RejectCode.INVALID_FIELD, "payload digest mismatch")
        try:
            # The mean folds the values into its sum before this call returns, so a view of
            # the frame will do; centered clipping keeps every sender's values until the
            # chunk is complete, and frames may live in a reused receive buffer.
            if self.mode == "mean":
                values = self._codec.decode_view(payload, chunk.size)
            else:
                values = self._codec.decode(payload, chunk.size)
        except ProtocolViolation as exc:
            return bad(exc.code, exc.detail)

        if reduction is None:
            reduction = self._reductions[chunk.index] = self._begin(chunk)
        self._add(reduction, sender, values)
        del values  # under the mean it now lives in the sum only
        self._delivered[sender] += 1
        self._sender_progress[sender] = now
        if self._live_senders <= reduction.senders:
            return self._finish(chunk, now)
        return []

    def _begin(self, chunk: Chunk) -> _Reduction:
        reduction = _Reduction()
        own = self._buffer[chunk.start : chunk.end]
        if self.mode == "mean":
            # Sums are recycled from finished chunks: a fresh multi-MiB array per chunk would
            # cost as much in page faults as the arithmetic itself.
            base = self._free_sums.pop() if self._free_sums else None
            if base is None or base.size < chunk.size:
                base = np.empty(max(chunk.size, self.max_chunk), dtype=np.float64)
            acc = base[: chunk.size]
            np.multiply(own, self._share[self.peer_id], out=acc, dtype=np.float64)
            reduction.acc = acc
        else:
            # A view: the buffer slice is only overwritten by this chunk's own result.
            reduction.values[self.peer_id] = own
        return reduction

    def _add(self, reduction: _Reduction, sender: bytes, values: FloatArray) -> None:
        reduction.senders.add(sender)
        acc = reduction.acc
        if acc is None:
            reduction.values[sender] = values
            return
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = np.empty(min(self.max_chunk, _SCRATCH), dtype=np.float64)
        share = self._share[sender]
        # Block by block through a small scratch, so a chunk in progress costs its float64
        # sum and nothing more; dtype=float64 forces the float64 loop, which a Python float
        # factor alone would not (float32 * float stays float32).
        for at in range(0, values.size, scratch.size):
            part = scratch[: min(scratch.size, values.size - at)]
            np.multiply(values[at : at + part.size], share, out=part, dtype=np.float64)
            acc[at : at + part.size] += part

    def _finish_ready(self, now: float) -> list[Send]:
        sends: list[Send] = []
        for index in sorted(self._open):
            reduction = self._reductions.get(index)
            got = reduction.senders if reduction is not None else set()
            if self._live_senders <= got:
                sends.extend(self._finish(self._my_chunks[index], now))
        return sends

    def _finish(self, chunk: Chunk, now: float) -> list[Send]:
        reduction = self._reductions.pop(chunk.index, None)
        arrived = reduction.senders if reduction is not None else set()
        contributors = tuple(p for p in self.spec.peer_ids if p == self.peer_id or p in arrived)
        own = self._buffer[chunk.start : chunk.end]
        values: FloatArray = own
        if reduction is None or not arrived:
            pass
        elif reduction.acc is not None:
            acc = reduction.acc
            acc /= math.fsum(self._share[p] for p in contributors)
            # Rounded straight into the buffer: no float32 copy of the chunk is needed.
            own[:] = acc
            if acc.base is not None and len(self._free_sums) < _MAX_FREE_SUMS:
                self._free_sums.append(acc.base)
            del acc
            reduction.acc = None
        else:
            agg = centered_clip(
                [
                    Contribution(p, reduction.values[p], self.spec.member(p).weight)
                    for p in contributors
                ],
                iterations=self._clip_iterations,
                outlier_ratio=self._outlier_ratio,
            )
            values = agg.values
            for r in agg.reports:
                if r.outlier and r.sender != self.peer_id:
                    self._event(r.sender, ScoreEvent.OUTLIER)
        del reduction
        if self._error_feedback is not None and self._codec.name != "none":
            payload: Buffer = self._error_feedback.encode_result(values, chunk.start)
        else:
            payload = self._codec.encode_view(values)
        if self._codec.name != "none":
            # Apply what the others will decode, so every member ends with the same bits.
            own[:] = self._codec.decode(payload, chunk.size)
        elif values is not own:
            own[:] = values
        del values
        weights = tuple(self.spec.member(p).weight for p in contributors)
        digest = payload_digest(payload)
        signature = self._sign(
            result_signing_payload(
                self.spec.run,
                self.spec.round,
                self.spec.group_id,
                self._me,
                chunk.index,
                chunk.start,
                chunk.end,
                self.peer_id,
                contributors,
                weights,
                self._codec.name,
                digest,
            )
        )
        header = ResultHeader(
            run=self.spec.run,
            round=self.spec.round,
            group_id=self.spec.group_id,
            span_index=self._me,
            chunk_index=chunk.index,
            start=chunk.start,
            end=chunk.end,
            reducer=self.peer_id,
            contributors=contributors,
            weights=weights,
            codec=self._codec.name,
            digest=digest,
            signature=signature,
        )
        buffers = pack_frame(header, payload)
        size = frame_size(buffers)

        def render() -> list[Buffer]:
            self._bytes_sent += size
            return buffers

        self._mine[chunk.index] = ChunkOutcome(
            chunk.index, chunk.start, chunk.end, _status(contributors), contributors
        )
        self._open.discard(chunk.index)
        self._pending -= 1
        sends = [
            Send(p, "result", self._me, chunk.index, render)
            for p in self._others
            if p not in self._gone
        ]
        self._maybe_done(now)
        return sends

    def _chunk_send(self, span_index: int, chunk: Chunk) -> Send:
        recipient = self.partition.spans[span_index].peer_id
        weight = self.spec.member(self.peer_id).weight

        def render() -> list[Buffer]:
            values = self._buffer[chunk.start : chunk.end]
            payload = (
                self._codec.encode_view(values)
                if self._error_feedback is None
                else self._error_feedback.encode(values, chunk.start)
            )
            digest = payload_digest(payload)
            header = ChunkHeader(
                run=self.spec.run,
                round=self.spec.round,
                group_id=self.spec.group_id,
                span_index=span_index,
                chunk_index=chunk.index,
                start=chunk.start,
                end=chunk.end,
                sender=self.peer_id,
                recipient=recipient,
                codec=self._codec.name,
                weight=weight,
                digest=digest,
                signature=self._sign(
                    chunk_signing_payload(
                        self.spec.run,
                        self.spec.round,
                        self.spec.group_id,
                        span_index,
                        chunk.index,
                        chunk.start,
                        chunk.end,
                        self.peer_id,
                        recipient,
                        self._codec.name,
                        weight,
                        digest,
                    )
                ),
            )
            buffers = pack_frame(header, payload)
            self._bytes_sent += frame_size(buffers)
            return buffers

        return Send(recipient, "chunk", span_index, chunk.index, render)

    # ---------------------------------------------------------------------- other spans

    def _on_result(
        self, sender: bytes, h: ResultHeader, payload: memoryview, now: float
    ) -> list[Send]:
        if h.reducer != sender:
            return self._violation(
                sender,
                RejectCode.FORBIDDEN,
                "result signed as another peer",
                ScoreEvent.MALFORMED,
                now,
                True,
            )
        span_index, chunk_index = self._locate(sender, h)
        known = span_index is not None and chunk_index is not None

        def bad(
            code: RejectCode, detail: str, event: ScoreEvent = ScoreEvent.MALFORMED
        ) -> list[Send]:
            sends = self._violation(sender, code, detail, event, now, False)
            if known:
                assert span_index is not None and chunk_index is not None
                # The reducer sends each result once: this chunk will not come right.
                self._settle_local(span_index, chunk_index, f"invalid result: {detail}", now)
            return sends

        if not self._verify(sender, h.signing_payload(), h.signature):
            return bad(RejectCode.BAD_SIGNATURE, "result signature", ScoreEvent.BAD_SIGNATURE)
        if h.run != self.spec.run or h.round != self.spec.round:
            return self._violation(
                sender,
                RejectCode.UNEXPECTED,
                f"result of round {h.round}",
                ScoreEvent.MALFORMED,
                now,
                False,
            )
        if h.group_id != self.spec.group_id:
            return self._group_mismatch(sender, now)
        if sender not in self.spec:
            return self._violation(
                sender,
                RejectCode.FORBIDDEN,
                "reducer is not a member",
                ScoreEvent.MALFORMED,
                now,
                False,
            )
        if not known:
            return self._violation(
                sender,
                RejectCode.INVALID_FIELD,
                "result for a span or chunk it does not reduce",
                ScoreEvent.MALFORMED,
                now,
                False,
            )
        assert span_index is not None and chunk_index is not None
        chunk = self._span_chunks[span_index][chunk_index]
        outcome = self._results[span_index][chunk_index]
        if outcome is not None:
            if outcome.status is ChunkStatus.LOCAL:
                return []  # given up on already; applying it now would break the report
            return self._violation(
                sender, RejectCode.UNEXPECTED, "duplicate result", ScoreEvent.MALFORMED, now, False
            )
        if h.codec != self._codec.name:
            return bad(RejectCode.INVALID_FIELD, f"codec {h.codec!r}, the run uses another")
        order = [self.spec.index_of(p) if p in self.spec else -1 for p in h.contributors]
        if min(order) < 0 or order != sorted(order):
            return bad(RejectCode.INVALID_FIELD, "contributors are not members in group order")
        if h.weights != tuple(self.spec.member(p).weight for p in h.contributors):
            return bad(RejectCode.INVALID_FIELD, "contributor weights differ from the announced")
        if payload.nbytes != self._codec.encoded_size(chunk.size):
            return bad(RejectCode.INVALID_FIELD, "payload length does not match the range")
        if payload_digest(payload) != h.digest:
            return bad(RejectCode.INVALID_FIELD, "payload digest mismatch")
        try:
            values = self._codec.decode_view(payload, chunk.size)
        except ProtocolViolation as exc:
            return bad(exc.code, exc.detail)
        self._buffer[chunk.start : chunk.end] = values
        self._results[span_index][chunk_index] = ChunkOutcome(
            chunk.index, chunk.start, chunk.end, _status(h.contributors), h.contributors
        )
        self._unsettled[span_index] -= 1
        self._pending -= 1
        self._reducer_progress[sender] = now
        self._maybe_done(now)
        return []

    def _locate(self, reducer: bytes, h: ResultHeader) -> tuple[int | None, int | None]:
        """The (span, chunk) a result from ``reducer`` is for, if it names one that
        ``reducer`` reduces for us, with the range of our layout."""
        si = h.span_index
        if si not in self._results or self.partition.spans[si].peer_id != reducer:
            return None, None
        chunks = self._span_chunks[si]
        if h.chunk_index >= len(chunks):
            return si, None
        chunk = chunks[h.chunk_index]
        if (chunk.start, chunk.end) != (h.start, h.end):
            return si, None
        return si, h.chunk_index

    def _settle_local(self, span_index: int, chunk_index: int, reason: str, now: float) -> None:
        outcomes = self._results[span_index]
        if outcomes[chunk_index] is not None:
            return
        c = self._span_chunks[span_index][chunk_index]
        outcomes[chunk_index] = ChunkOutcome(c.index, c.start, c.end, ChunkStatus.LOCAL, (), reason)
        self._unsettled[span_index] -= 1
        self._pending -= 1
        self._maybe_done(now)

    # --------------------------------------------------------------- exclusion, scoring

    def _violation(
        self,
        peer: bytes,
        code: RejectCode,
        detail: str,
        event: ScoreEvent,
        now: float,
        exclude: bool,
    ) -> list[Send]:
        """Record, score and answer a refused frame; with ``exclude``, also stop counting
        ``peer`` as a sender to our span (its stream can no longer be trusted)."""
        self._record_violation(peer, code, detail, now)
        self._event(peer, event)
        sends: list[Send] = []
        if exclude and peer in self.spec and peer != self.peer_id:
            reason = (
                ExclusionReason.BAD_SIGNATURE
                if event is ScoreEvent.BAD_SIGNATURE
                else ExclusionReason.MALFORMED
            )
            if self._exclude_sender(peer, reason, now, detail):
                sends.extend(self._finish_ready(now))
        sends.append(self._reject(peer, code, detail))
        return sends

    def _group_mismatch(self, peer: bytes, now: float) -> list[Send]:
        # An honest peer whose DHT view differed sends exactly this, so it is not scored;
        # but nothing it sends this round can match our layout, so stop waiting for it.
        detail = "group id differs: another view of the group"
        self._record_violation(peer, RejectCode.UNEXPECTED, detail, now)
        sends: list[Send] = []
        if peer in self.spec and peer != self.peer_id:
            sends = self._fail(peer, ExclusionReason.GROUP_MISMATCH, now, detail)
            self._maybe_done(now)
        sends.append(self._reject(peer, RejectCode.UNEXPECTED, detail))
        return sends

    def _fail(self, peer: bytes, reason: ExclusionReason, now: float, detail: str) -> list[Send]:
        self._gone.add(peer)
        sends: list[Send] = []
        if self._exclude_sender(peer, reason, now, detail):
            sends = self._finish_ready(now)
        self._abandon_reducer(peer, reason, now, detail)
        return sends

    def _exclude_sender(
        self, peer: bytes, reason: ExclusionReason, now: float, detail: str
    ) -> bool:
        """Stop awaiting ``peer``'s chunks; True if it still owed some (the caller then
        finishes the chunks that became complete)."""
        if peer not in self._live_senders:
            return False
        self._live_senders.discard(peer)
        if not self._owes_chunks(peer):
            return False
        self._add_exclusion(ExcludedPeer(peer, "sender", reason, now, detail))
        return True

    def _abandon_reducer(
        self, peer: bytes, reason: ExclusionReason, now: float, detail: str
    ) -> None:
        si = self.spec.index_of(peer)
        if not self._unsettled.get(si):
            return
        self._add_exclusion(ExcludedPeer(peer, "reducer", reason, now, detail))
        for ci, outcome in enumerate(self._results[si]):
            if outcome is None:
                self._settle_local(si, ci, f"reducer {reason.value}", now)

    def _add_exclusion(self, exclusion: ExcludedPeer) -> None:
        key = (exclusion.peer, exclusion.role)
        if key not in self._excluded_roles:
            self._excluded_roles.add(key)
            self._excluded.append(exclusion)

    def _owes_chunks(self, peer: bytes) -> bool:
        return bool(self._my_chunks) and self._delivered.get(peer, 0) < len(self._my_chunks)

    def _owes_results(self, peer: bytes) -> bool:
        return bool(self._unsettled.get(self.spec.index_of(peer)))

    def _score_timeout(self, peer: bytes) -> None:
        if peer not in self._timeout_scored:
            self._timeout_scored.add(peer)
            self._event(peer, ScoreEvent.TIMEOUT)

    def _event(self, peer: bytes, event: ScoreEvent) -> None:
        self._events.append((peer, event))
        if event is not ScoreEvent.SUCCESS:
            self._penalized.add(peer)

    def _record_violation(self, peer: bytes, code: RejectCode, detail: str, now: float) -> None:
        if len(self._violations) < MAX_REPORTED_VIOLATIONS:
            self._violations.append(Violation(peer, code.name, detail, now))
        else:
            self._violations_dropped += 1

    def _reject(self, peer: bytes, code: RejectCode, detail: str) -> Send:
        buffers = pack_frame(Reject(code=int(code), detail=detail[:512]))
        size = frame_size(buffers)

        def render() -> list[Buffer]:
            self._bytes_sent += size
            return buffers

        return Send(peer, "reject", -1, -1, render)

    def _verify(self, peer: bytes, data: bytes, signature: bytes) -> bool:
        if peer in self._keys:
            key = self._keys[peer]
        else:
            key = public_key_of(peer)
            if peer in self.spec:
                self._keys[peer] = key
        return key is not None and verify(key, data, signature)

    # ------------------------------------------------------------------------ bookkeeping

    def _touch(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        if self._t0 is None:
            self._t0 = now

    def _progress(self, peer: bytes, as_sender: bool) -> float:
        assert self._t0 is not None
        table = self._sender_progress if as_sender else self._reducer_progress
        return table.get(peer, self._t0)

    def _maybe_done(self, now: float) -> None:
        if self._finished_at is not None or self._started_at is None or self._pending:
            return
        self._finished_at = now
        self._scratch = None
        self._free_sums.clear()
        for peer in self._others:
            owed_chunks = bool(self._my_chunks)
            si = self.spec.index_of(peer)
            owed_results = si in self._results
            if not (owed_chunks or owed_results) or peer in self._penalized:
                continue
            if any(p == peer for p, _ in self._excluded_roles):
                continue
            chunks_ok = not owed_chunks or self._delivered[peer] == len(self._my_chunks)
            results_ok = not owed_results or all(
                o is not None and o.status is not ChunkStatus.LOCAL for o in self._results[si]
            )
            if chunks_ok and results_ok:
                self._events.append((peer, ScoreEvent.SUCCESS))


_PENDING = ChunkStatus.PENDING


def _status(contributors: tuple[bytes, ...]) -> ChunkStatus:
    return ChunkStatus.AVERAGED if len(contributors) >= 2 else ChunkStatus.SOLO


def _code_name(code: int) -> str:
    try:
        return RejectCode(code).name
    except ValueError:
        return f"code {code}"
