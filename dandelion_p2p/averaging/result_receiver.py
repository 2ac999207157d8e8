"""The receiver of the other spans' results: it checks each reducer's signed aggregate against
the group's layout and writes it into the buffer, or leaves the chunk at local values.

A chunk is settled once: applied (``AVERAGED`` or ``SOLO``, as the result says) or left
``LOCAL``, when its reducer fails, times out (``abandon``) or sends an invalid result for it.
A result arriving after its chunk was left local is not applied: the report says which chunks
were averaged, and that must stay true.

Frames reach ``on_result`` only after ``admission.Admission`` passed them; what is refused here
is answered with a ``Refusal`` for ``AllReducePeer`` to record, score and answer.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.averaging.admission import Refusal
from dandelion_p2p.averaging.compression import Codec
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.ledger import RoundLedger
from dandelion_p2p.averaging.messages import ResultHeader, payload_digest
from dandelion_p2p.averaging.partition import Chunk, Partition
from dandelion_p2p.averaging.report import (
    ChunkOutcome,
    ChunkStatus,
    ExcludedPeer,
    ExclusionReason,
    status_of,
)
from dandelion_p2p.averaging.sends import MAX_RESENDS
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.wire import RejectCode


class ResultReceiver:
    """The chunks of every span but ``my_span``, as a receiver of their reducers' results."""

    def __init__(
        self,
        *,
        spec: GroupSpec,
        partition: Partition,
        span_chunks: tuple[tuple[Chunk, ...], ...],
        my_span: int,
        buffer: NDArray[np.float32],
        codec: Codec,
        ledger: RoundLedger,
    ) -> None:
        self._spec = spec
        self._partition = partition
        self._span_chunks = span_chunks
        self._buffer = buffer
        self._codec = codec
        self._ledger = ledger
        self._results: dict[int, list[ChunkOutcome | None]] = {
            i: [None] * len(chunks)
            for i, chunks in enumerate(span_chunks)
            if i != my_span and chunks
        }
        self._unsettled: dict[int, int] = {i: len(v) for i, v in self._results.items()}
        self._pending = sum(self._unsettled.values())
        self._progress: dict[bytes, float] = {}
        # The digest of each result applied, and the copies of applied results ignored per
        # reducer: the same signed result sent again over a new channel is not a violation.
        self._digests: dict[tuple[int, int], bytes] = {}
        self._duplicates: dict[bytes, int] = {}
        # Our own values of each chunk a result replaced, until the round ends: what a chunk
        # goes back to when its reducer turns out to have sent members different results.
        self._replaced: dict[tuple[int, int], NDArray[np.float32]] = {}

    # --------------------------------------------------------------------------- queries

    @property
    def unsettled_chunks(self) -> int:
        """Chunks of other spans neither applied nor left local yet."""
        return self._pending

    def outcomes(self, span_index: int) -> tuple[ChunkOutcome | None, ...]:
        """Per chunk of span ``span_index``, its outcome once settled (empty for our own
        span and for spans without elements)."""
        return tuple(self._results.get(span_index, ()))

    def expects_results_from(self, peer: bytes) -> bool:
        """Whether ``peer`` reduces a span that holds elements."""
        return self._spec.index_of(peer) in self._results

    def owes(self, peer: bytes) -> bool:
        """Whether results of ``peer``'s span are still awaited."""
        return bool(self._unsettled.get(self._spec.index_of(peer)))

    def applied_all(self, peer: bytes) -> bool:
        """Whether every chunk of ``peer``'s span was replaced by its result."""
        return all(
            o is not None and o.status is not ChunkStatus.LOCAL
            for o in self._results[self._spec.index_of(peer)]
        )

    def overdue(self, now: float, since: float, timeout: float) -> list[bytes]:
        """Reducers with results still awaited that sent none valid for ``timeout`` seconds
        (the round's activity began at ``since``), in span order."""
        late = []
        for si, left in sorted(self._unsettled.items()):
            reducer = self._reducer(si)
            if left and now - self._progress.get(reducer, since) >= timeout:
                late.append(reducer)
        return late

    def deadlines(self, since: float, timeout: float) -> list[float]:
        """When each reducer with results still awaited times out."""
        return [
            self._progress.get(self._reducer(si), since) + timeout
            for si, left in self._unsettled.items()
            if left
        ]

    # ---------------------------------------------------------------------------- inputs

    def on_result(
        self, sender: bytes, h: ResultHeader, payload: memoryview, now: float
    ) -> Refusal | None:
        """A result that passed the common checks: refused, or applied (or ignored, for a
        chunk already left local)."""

        def bad(code: RejectCode, detail: str) -> Refusal:
            return Refusal(code, detail, settle=True)

        span_index, chunk_index = self.locate(sender, h)
        if span_index is None or chunk_index is None:
            return Refusal(
                RejectCode.INVALID_FIELD, "result for a span or chunk it does not reduce"
            )
        chunk = self._span_chunks[span_index][chunk_index]
        outcome = self._results[span_index][chunk_index]
        if outcome is not None:
            if outcome.status is ChunkStatus.LOCAL:
                return None  # given up on already; applying it now would break the report
            seen = self._duplicates.get(sender, 0)
            if (
                self._digests.get((span_index, chunk_index)) == h.digest
                and seen < MAX_RESENDS * len(self._span_chunks[span_index])
            ):
                self._duplicates[sender] = seen + 1
                return None
            return Refusal(RejectCode.UNEXPECTED, "duplicate result")
        if h.codec != self._codec.name:
            return bad(RejectCode.INVALID_FIELD, f"codec {h.codec!r}, the run uses another")
        order = [self._spec.index_of(p) if p in self._spec else -1 for p in h.contributors]
        if min(order) < 0 or order != sorted(order):
            return bad(RejectCode.INVALID_FIELD, "contributors are not members in group order")
        if h.weights != tuple(self._spec.member(p).weight for p in h.contributors):
            return bad(RejectCode.INVALID_FIELD, "contributor weights differ from the announced")
        if payload.nbytes != self._codec.encoded_size(chunk.size):
            return bad(RejectCode.INVALID_FIELD, "payload length does not match the range")
        if payload_digest(payload) != h.digest:
            return bad(RejectCode.INVALID_FIELD, "payload digest mismatch")
        try:
            values = self._codec.decode_view(payload, chunk.size)
        except ProtocolViolation as exc:
            return bad(exc.code, exc.detail)
        self._replaced[(span_index, chunk_index)] = self._buffer[chunk.start : chunk.end].copy()
        self._digests[(span_index, chunk_index)] = h.digest
        self._buffer[chunk.start : chunk.end] = values
        self._results[span_index][chunk_index] = ChunkOutcome(
            chunk.index, chunk.start, chunk.end, status_of(h.contributors), h.contributors
        )
        self._unsettled[span_index] -= 1
        self._pending -= 1
        self._progress[sender] = now
        return None

    def locate(self, reducer: bytes, h: ResultHeader) -> tuple[int | None, int | None]:
        """The (span, chunk) a result from ``reducer`` is for, if it names one that
        ``reducer`` reduces for us, with the range of our layout."""
        si = h.span_index
        if si not in self._results or self._reducer(si) != reducer:
            return None, None
        chunks = self._span_chunks[si]
        if h.chunk_index >= len(chunks):
            return si, None
        chunk = chunks[h.chunk_index]
        if (chunk.start, chunk.end) != (h.start, h.end):
            return si, None
        return si, h.chunk_index

    def settle_refused(self, reducer: bytes, h: ResultHeader, detail: str) -> None:
        """Leave the chunk of a refused result at local values, if it names one of ours."""
        span_index, chunk_index = self.locate(reducer, h)
        if span_index is not None and chunk_index is not None:
            self._settle_local(span_index, chunk_index, f"invalid result: {detail}")

    def abandon(self, peer: bytes, reason: ExclusionReason, now: float, detail: str) -> None:
        """Stop waiting for ``peer``'s results: its chunks still missing stay local."""
        si = self._spec.index_of(peer)
        if not self._unsettled.get(si):
            return
        self._ledger.add_exclusion(ExcludedPeer(peer, "reducer", reason, now, detail))
        for ci, outcome in enumerate(self._results[si]):
            if outcome is None:
                self._settle_local(si, ci, f"reducer {reason.value}")

    def revert(self, reducer: bytes, now: float, detail: str) -> None:
        """``reducer`` signed different results for one chunk: every chunk of its span goes
        back to (or stays at) our local values and is reported ``LOCAL``."""
        si = self._spec.index_of(reducer)
        if si not in self._results:
            return
        self._ledger.add_exclusion(
            ExcludedPeer(reducer, "reducer", ExclusionReason.EQUIVOCATION, now, detail)
        )
        for ci, outcome in enumerate(self._results[si]):
            c = self._span_chunks[si][ci]
            if outcome is None:
                self._settle_local(si, ci, "reducer equivocated")
                continue
            local = self._replaced.pop((si, ci), None)
            if local is not None:
                self._buffer[c.start : c.end] = local
            self._results[si][ci] = ChunkOutcome(
                c.index, c.start, c.end, ChunkStatus.LOCAL, (), "reducer equivocated"
            )

    def release(self) -> None:
        """Drop the copies of replaced values once the round is over."""
        self._replaced.clear()

    def settled(self, span_index: int, chunk_index: int) -> bool:
        """Whether chunk ``chunk_index`` of span ``span_index`` is applied or left local."""
        outcomes = self._results.get(span_index)
        return outcomes is None or outcomes[chunk_index] is not None

    def applied(self, reducer: bytes, h: ResultHeader) -> bool:
        """Whether the chunk ``h`` names holds ``reducer``'s result now."""
        span_index, chunk_index = self.locate(reducer, h)
        if span_index is None or chunk_index is None:
            return False
        outcome = self._results[span_index][chunk_index]
        return outcome is not None and outcome.status is not ChunkStatus.LOCAL

    # -------------------------------------------------------------------------- internals

    def _reducer(self, span_index: int) -> bytes:
        return self._partition.spans[span_index].peer_id

    def _settle_local(self, span_index: int, chunk_index: int, reason: str) -> None:
        outcomes = self._results[span_index]
        if outcomes[chunk_index] is not None:
            return
        c = self._span_chunks[span_index][chunk_index]
        outcomes[chunk_index] = ChunkOutcome(c.index, c.start, c.end, ChunkStatus.LOCAL, (), reason)
        self._unsettled[span_index] -= 1
        self._pending -= 1
