"""The reducer of one peer's own span: it takes the other members' chunks, aggregates each
chunk once every sender still counted has delivered it, and returns the signed result frames.

A sender is counted ("live") until it is excluded: for a timeout, a failure, a violation or a
ban (``exclude_sender``). Its contributions already folded in stay in; chunks that only
waited for it are finished at once (``finish_ready``). The reducer's own values are
contributed locally, so a span nobody else reaches still finishes, as ``SOLO``.

Frames reach ``on_chunk`` only after ``admission.Admission`` passed them; what is refused here
is answered with a ``Refusal`` for ``AllReducePeer`` to record, score and answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.averaging.admission import Refusal
from dandelion_p2p.averaging.aggregation import Contribution, centered_clip
from dandelion_p2p.averaging.compression import BufferErrorFeedback, Codec
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.ledger import RoundLedger
from dandelion_p2p.averaging.messages import Buffer, ChunkHeader, payload_digest
from dandelion_p2p.averaging.partition import Chunk
from dandelion_p2p.averaging.report import (
    ChunkOutcome,
    ExcludedPeer,
    ExclusionReason,
    status_of,
)
from dandelion_p2p.averaging.sends import MAX_RESENDS, Framer, Send
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import RejectCode

Mode = Literal["mean", "centered_clip"]
FloatArray = NDArray[np.float32]

_SCRATCH = 1 << 15
# Float64 sums of finished chunks kept for reuse; more only exist while more chunks are open.
_MAX_FREE_SUMS = 4


@dataclass(slots=True)
class _Reduction:
    """A chunk of our span in progress: what has arrived so far."""

    senders: set[bytes] = field(default_factory=set)
    acc: NDArray[np.float64] | None = None
    values: dict[bytes, FloatArray] = field(default_factory=dict)


class SpanReducer:
    """Our span's chunks, as their reducer. ``buffer`` is read for our own contribution and
    written with each chunk's result when it is finished."""

    def __init__(
        self,
        *,
        peer_id: bytes,
        spec: GroupSpec,
        span_index: int,
        chunks: tuple[Chunk, ...],
        buffer: FloatArray,
        codec: Codec,
        mode: Mode,
        max_chunk: int,
        clip_iterations: int,
        outlier_ratio: float,
        error_feedback: BufferErrorFeedback | None,
        ledger: RoundLedger,
        framer: Framer,
    ) -> None:
        self._peer_id = peer_id
        self._spec = spec
        self._span_index = span_index
        self._chunks = chunks
        self._buffer = buffer
        self._codec = codec
        self._mode: Mode = mode
        self._max_chunk = max_chunk
        self._clip_iterations = clip_iterations
        self._outlier_ratio = outlier_ratio
        self._error_feedback = error_feedback
        self._ledger = ledger
        self._framer = framer

        self._others = tuple(p for p in spec.peer_ids if p != peer_id)
        max_weight = max(m.weight for m in spec.members)
        # Shares relative to the heaviest member keep the float64 running sum finite whatever
        # the announced weights.
        self._share = {m.peer_id: m.weight / max_weight for m in spec.members}
        self._reductions: dict[int, _Reduction] = {}
        self._outcomes: list[ChunkOutcome | None] = [None] * len(chunks)
        self._open: set[int] = set(range(len(chunks)))
        self._live: set[bytes] = set(self._others) if chunks else set()
        self._delivered: dict[bytes, int] = dict.fromkeys(self._others, 0)
        self._duplicates: dict[bytes, int] = dict.fromkeys(self._others, 0)
        self._progress: dict[bytes, float] = {}
        self._scratch: NDArray[np.float64] | None = None
        self._free_sums: list[NDArray[np.float64]] = []

    # --------------------------------------------------------------------------- queries

    @property
    def has_chunks(self) -> bool:
        """Whether our span holds any element (others then owe us their chunks)."""
        return bool(self._chunks)

    @property
    def open_chunks(self) -> int:
        """Chunks of our span not finished yet."""
        return len(self._open)

    @property
    def in_progress(self) -> int:
        """Chunks holding contributions in memory."""
        return len(self._reductions)

    @property
    def outcomes(self) -> tuple[ChunkOutcome | None, ...]:
        """Per chunk of our span, its outcome once finished."""
        return tuple(self._outcomes)

    def owes(self, peer: bytes) -> bool:
        """Whether ``peer`` is still counted as a sender and has chunks left to deliver."""
        return peer in self._live and self._owes_chunks(peer)

    def delivered_all(self, peer: bytes) -> bool:
        """Whether ``peer`` delivered a valid chunk for every chunk of our span."""
        return self._delivered.get(peer, 0) == len(self._chunks)

    def late_senders(self, now: float, since: float, timeout: float) -> list[bytes]:
        """Counted senders that owe chunks and sent none valid for ``timeout`` seconds (the
        round's activity began at ``since``), in peer id order."""
        if not self._open:
            return []
        return [
            s
            for s in sorted(self._live)
            if self._owes_chunks(s) and now - self._progress.get(s, since) >= timeout
        ]

    def deadlines(self, since: float, timeout: float) -> list[float]:
        """When each counted sender that still owes chunks times out."""
        if not self._open:
            return []
        return [self._progress.get(s, since) + timeout for s in self._live if self._owes_chunks(s)]

    # ---------------------------------------------------------------------------- inputs

    def on_chunk(
        self, sender: bytes, h: ChunkHeader, payload: memoryview, now: float
    ) -> Refusal | list[Send]:
        """A chunk that passed the common checks: refused, ignored (``[]``), or folded in,
        with the result frames when it completed its chunk."""

        def bad(code: RejectCode, detail: str) -> Refusal:
            return Refusal(code, detail, exclude=True)

        if h.recipient != self._peer_id:
            return bad(RejectCode.INVALID_FIELD, "chunk addressed to another peer")
        if h.span_index != self._span_index:
            return bad(RejectCode.INVALID_FIELD, f"span {h.span_index} is not reduced here")
        if h.chunk_index >= len(self._chunks):
            return bad(RejectCode.INVALID_FIELD, f"no chunk {h.chunk_index} in this span")
        chunk = self._chunks[h.chunk_index]
        if (h.start, h.end) != (chunk.start, chunk.end):
            return bad(RejectCode.INVALID_FIELD, "chunk range does not match the layout")
        if h.codec != self._codec.name:
            return bad(RejectCode.INVALID_FIELD, f"codec {h.codec!r}, the run uses another")
        if h.weight != self._spec.member(sender).weight:
            return bad(RejectCode.INVALID_FIELD, "weight differs from the announced one")
        if payload.nbytes != self._codec.encoded_size(chunk.size):
            return bad(RejectCode.INVALID_FIELD, "payload length does not match the range")
        if sender not in self._live:
            return []  # excluded already (late, failed or misbehaved): ignored, not scored again
        reduction = self._reductions.get(chunk.index)
        if self._outcomes[chunk.index] is not None or (
            reduction is not None and sender in reduction.senders
        ):
            # A sender whose channel broke sends again what it may have lost; the first
            # copy counted, so the resent one is dropped (up to the resends it may make).
            if self._duplicates[sender] < MAX_RESENDS * len(self._chunks):
                self._duplicates[sender] += 1
                return []
            return Refusal(RejectCode.UNEXPECTED, "duplicate chunk")
        if payload_digest(payload) != h.digest:
            return bad(RejectCode.INVALID_FIELD, "payload digest mismatch")
        try:
            # The mean folds the values into its sum before this call returns, so a view of
            # the frame will do; centered clipping keeps every sender's values until the
            # chunk is complete, and frames may live in a reused receive buffer.
            if self._mode == "mean":
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
        self._progress[sender] = now
        if self._live <= reduction.senders:
            return self._finish(chunk)
        return []

    def exclude_sender(self, peer: bytes, reason: ExclusionReason, now: float, detail: str) -> bool:
        """Stop awaiting ``peer``'s chunks; True if it still owed some (the caller then
        finishes the chunks that became complete, with ``finish_ready``)."""
        if peer not in self._live:
            return False
        self._live.discard(peer)
        if not self._owes_chunks(peer):
            return False
        self._ledger.add_exclusion(ExcludedPeer(peer, "sender", reason, now, detail))
        return True

    def finish_ready(self) -> list[Send]:
        """Finish every open chunk that every counted sender has delivered."""
        sends: list[Send] = []
        for index in sorted(self._open):
            reduction = self._reductions.get(index)
            got = reduction.senders if reduction is not None else set()
            if self._live <= got:
                sends.extend(self._finish(self._chunks[index]))
        return sends

    def release(self) -> None:
        """Drop the scratch memory kept for chunks to come (the round is over)."""
        self._scratch = None
        self._free_sums.clear()

    # -------------------------------------------------------------------------- internals

    def _owes_chunks(self, peer: bytes) -> bool:
        return bool(self._chunks) and self._delivered.get(peer, 0) < len(self._chunks)

    def _begin(self, chunk: Chunk) -> _Reduction:
        reduction = _Reduction()
        own = self._buffer[chunk.start : chunk.end]
        if self._mode == "mean":
            # Sums are recycled from finished chunks: a fresh multi-MiB array per chunk would
            # cost as much in page faults as the arithmetic itself.
            base = self._free_sums.pop() if self._free_sums else None
            if base is None or base.size < chunk.size:
                base = np.empty(max(chunk.size, self._max_chunk), dtype=np.float64)
            acc = base[: chunk.size]
            np.multiply(own, self._share[self._peer_id], out=acc, dtype=np.float64)
            reduction.acc = acc
        else:
            # A view: the buffer slice is only overwritten by this chunk's own result.
            reduction.values[self._peer_id] = own
        return reduction

    def _add(self, reduction: _Reduction, sender: bytes, values: FloatArray) -> None:
        reduction.senders.add(sender)
        acc = reduction.acc
        if acc is None:
            reduction.values[sender] = values
            return
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = np.empty(min(self._max_chunk, _SCRATCH), dtype=np.float64)
        share = self._share[sender]
        # Block by block through a small scratch, so a chunk in progress costs its float64
        # sum and nothing more; dtype=float64 forces the float64 loop, which a Python float
        # factor alone would not (float32 * float stays float32).
        for at in range(0, values.size, scratch.size):
            part = scratch[: min(scratch.size, values.size - at)]
            np.multiply(values[at : at + part.size], share, out=part, dtype=np.float64)
            acc[at : at + part.size] += part

    def _finish(self, chunk: Chunk) -> list[Send]:
        reduction = self._reductions.pop(chunk.index, None)
        arrived = reduction.senders if reduction is not None else set()
        contributors = tuple(p for p in self._spec.peer_ids if p == self._peer_id or p in arrived)
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
                    Contribution(p, reduction.values[p], self._spec.member(p).weight)
                    for p in contributors
                ],
                iterations=self._clip_iterations,
                outlier_ratio=self._outlier_ratio,
            )
            values = agg.values
            for r in agg.reports:
                if r.outlier and r.sender != self._peer_id:
                    self._ledger.event(r.sender, ScoreEvent.OUTLIER)
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
        recipients = [p for p in self._others if p not in self._ledger.gone]
        sends = self._framer.results(self._span_index, chunk, contributors, payload, recipients)
        self._outcomes[chunk.index] = ChunkOutcome(
            chunk.index, chunk.start, chunk.end, status_of(contributors), contributors
        )
        self._open.discard(chunk.index)
        return sends
