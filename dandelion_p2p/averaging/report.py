"""What one peer's all-reduce round achieved, exactly: per chunk, who was averaged in.

The summary numbers (``fraction_averaged``, ``complete``) are derived from the per-chunk
outcomes when the report is built, never passed in, so no caller can report a partial round as
a success: ``complete`` holds only when every element of the vector was replaced by a result
that included every member of the group.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from dandelion_p2p.identity import PeerId

Role = Literal["sender", "reducer"]


class ChunkStatus(enum.Enum):
    PENDING = "pending"
    """No result yet; the round is still running."""
    AVERAGED = "averaged"
    """Replaced by a reducer's result that included at least two contributors."""
    SOLO = "solo"
    """Replaced by the reducer's result over its own values only: everyone else was excluded.
    Identical on every member that got it, but not averaged."""
    LOCAL = "local"
    """No usable result (the reducer failed, timed out, or sent an invalid one): left at this
    peer's local values."""


def status_of(contributors: tuple[bytes, ...]) -> ChunkStatus:
    """The status of a chunk replaced by a result over ``contributors``."""
    return ChunkStatus.AVERAGED if len(contributors) >= 2 else ChunkStatus.SOLO


class ExclusionReason(enum.Enum):
    TIMEOUT = "timeout"
    FAILED = "failed"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    GROUP_MISMATCH = "group_mismatch"
    BANNED = "banned"
    EQUIVOCATION = "equivocation"


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    index: int
    start: int
    end: int
    status: ChunkStatus
    contributors: tuple[bytes, ...] = ()
    """Members whose values the result included, in group order (empty unless replaced)."""
    reason: str = ""
    """Why the chunk was left local, for logs."""

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SpanOutcome:
    index: int
    reducer: bytes
    start: int
    end: int
    chunks: tuple[ChunkOutcome, ...]

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def elements_averaged(self) -> int:
        return sum(c.size for c in self.chunks if c.status is ChunkStatus.AVERAGED)

    @property
    def status(self) -> str:
        """``empty``, ``pending``, ``averaged``, ``not_averaged`` (results of the reducer
        alone), ``local`` (no result at all), or ``partial`` (a mix)."""
        if not self.chunks:
            return "empty"
        kinds = {c.status for c in self.chunks}
        if ChunkStatus.PENDING in kinds:
            return "pending"
        if kinds == {ChunkStatus.AVERAGED}:
            return "averaged"
        if kinds == {ChunkStatus.SOLO}:
            return "not_averaged"
        if kinds == {ChunkStatus.LOCAL}:
            return "local"
        return "partial"

    @property
    def contributors(self) -> tuple[bytes, ...]:
        """Members included in every chunk of the span that was averaged (empty if none was)."""
        averaged = [c.contributors for c in self.chunks if c.status is ChunkStatus.AVERAGED]
        if not averaged:
            return ()
        common = set(averaged[0]).intersection(*averaged[1:])
        return tuple(p for p in averaged[0] if p in common)


@dataclass(frozen=True, slots=True)
class ExcludedPeer:
    """``peer`` stopped counting in one role: as a ``sender`` to this peer's span (its chunks
    no longer awaited nor accepted), or as a ``reducer`` (its span's remaining chunks left
    local)."""

    peer: bytes
    role: Role
    reason: ExclusionReason
    at: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Violation:
    """A frame refused from ``peer``, with the reject code's name."""

    peer: bytes
    code: str
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class RoundReport:
    run: bytes
    round: int
    group_id: bytes
    peer: bytes
    members: tuple[bytes, ...]
    reducers: tuple[bytes, ...]
    n_elements: int
    codec: str
    mode: str
    spans: tuple[SpanOutcome, ...]
    excluded: tuple[ExcludedPeer, ...]
    violations: tuple[Violation, ...]
    violations_dropped: int
    """Violations beyond the number kept in ``violations``."""
    rejects_received: tuple[Violation, ...]
    """Rejects other peers sent us about our frames."""
    bytes_sent: int
    """Bytes of every frame rendered for the transport."""
    bytes_received: int
    """Bytes of every frame handed in, refused ones included."""
    started_at: float | None
    finished_at: float | None
    equivocation_proofs: tuple[bytes, ...] = ()
    """Encoded ``EquivocationProof``s caught this round (protocol/averaging.md 6.7): what
    other peers may check and ban on without having taken part."""
    fraction_averaged: float = field(init=False)
    """Elements of this peer's vector replaced by a result with >= 2 contributors, over n."""
    complete: bool = field(init=False)
    """Every element was averaged over every member, and the round is over."""

    def __post_init__(self) -> None:
        averaged = sum(s.elements_averaged for s in self.spans)
        fraction = averaged / self.n_elements if self.n_elements else 0.0
        everyone = set(self.members)
        complete = (
            self.finished_at is not None
            and len(self.members) >= 2
            and self.n_elements > 0
            and averaged == self.n_elements
            and all(set(c.contributors) == everyone for s in self.spans for c in s.chunks)
        )
        object.__setattr__(self, "fraction_averaged", fraction)
        object.__setattr__(self, "complete", complete)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def excluded_peers(self) -> dict[bytes, tuple[ExclusionReason, ...]]:
        """Each excluded peer with its reasons, in the order they happened."""
        out: dict[bytes, tuple[ExclusionReason, ...]] = {}
        for e in self.excluded:
            out[e.peer] = (*out.get(e.peer, ()), e.reason)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; peers as base58, chunk contributors as member indices."""
        index = {p: i for i, p in enumerate(self.members)}
        return {
            "run": self.run.hex(),
            "round": self.round,
            "group_id": self.group_id.hex(),
            "peer": _b58(self.peer),
            "members": [_b58(p) for p in self.members],
            "reducers": [_b58(p) for p in self.reducers],
            "n_elements": self.n_elements,
            "codec": self.codec,
            "mode": self.mode,
            "fraction_averaged": self.fraction_averaged,
            "complete": self.complete,
            "done": self.done,
            "spans": [
                {
                    "index": s.index,
                    "reducer": _b58(s.reducer),
                    "start": s.start,
                    "end": s.end,
                    "status": s.status,
                    "elements_averaged": s.elements_averaged,
                    "contributors": [_b58(p) for p in s.contributors],
                    "chunks": [
                        {
                            "index": c.index,
                            "start": c.start,
                            "end": c.end,
                            "status": c.status.value,
                            "contributors": [index[p] for p in c.contributors],
                            **({"reason": c.reason} if c.reason else {}),
                        }
                        for c in s.chunks
                    ],
                }
                for s in self.spans
            ],
            "excluded": [
                {
                    "peer": _b58(e.peer),
                    "role": e.role,
                    "reason": e.reason.value,
                    "at": e.at,
                    "detail": e.detail,
                }
                for e in self.excluded
            ],
            "violations": [_violation(v) for v in self.violations],
            "violations_dropped": self.violations_dropped,
            "rejects_received": [_violation(v) for v in self.rejects_received],
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "equivocation_proofs": [p.hex() for p in self.equivocation_proofs],
        }


def _b58(peer: bytes) -> str:
    return PeerId(peer).to_base58()


def _violation(v: Violation) -> dict[str, Any]:
    return {"peer": _b58(v.peer), "code": v.code, "detail": v.detail, "at": v.at}
