"""Split a flat vector into contiguous spans, one per reducing peer, sized by bandwidth.

Every member of a group computes the partition from the same signed announcements, so the rule
must give bit-identical answers on every machine and for any input order:

1. Peers are sorted by peer id bytes; spans are laid out in that order, one per peer (possibly
   empty), together covering ``[0, n_elements)`` exactly.
2. Candidates are the peers that accept direct connections. If none does, every peer becomes a
   candidate and is reached through relays (``Fallback.RELAYED``): slow, but better than no
   reduction at all.
3. A candidate whose bandwidth is below ``min_bandwidth_fraction`` of the best candidate's
   reduces nothing. If the best candidate announced zero bandwidth, all candidates share
   equally (``Fallback.EQUAL``).
4. Boundaries: the ideal cumulative boundary ``n * (weights so far) / (total weight)`` is
   computed exactly with fractions (no float rounding can differ between peers), rounded
   half-up to the nearest multiple of ``block_size`` or to ``n``. So every span starts on a block
   boundary, only the span that ends at ``n`` may end off one, and each span is within one
   block of its ideal size (each of its two boundaries is off by at most half a block).

Chunks split one span further for streaming; they inherit the block alignment, so an int8
blockwise block never straddles a span or a chunk.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_BANDWIDTH_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class PeerBandwidth:
    """What a group member announced: its bandwidth (any unit shared by the group, e.g.
    bytes/s; finite, >= 0) and whether others can dial it directly."""

    peer_id: bytes
    bandwidth: float
    accepts_connections: bool = True


@dataclass(frozen=True, slots=True)
class Span:
    """Elements ``[start, end)`` of the flat vector, reduced by ``peer_id``."""

    peer_id: bytes
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Chunk:
    """Elements ``[start, end)`` of the flat vector: the ``index``-th chunk of its span."""

    index: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class Fallback(enum.Flag):
    """How the partition departed from the normal rule because nobody could reduce."""

    NONE = 0
    RELAYED = enum.auto()
    EQUAL = enum.auto()

    def describe(self) -> str:
        if not self:
            return "normal: direct peers reduce, sized by bandwidth"
        parts = []
        if Fallback.RELAYED in self:
            parts.append("no peer accepts direct connections, so reducers are reached by relay")
        if Fallback.EQUAL in self:
            parts.append("no candidate announced bandwidth, so candidates share equally")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Partition:
    n_elements: int
    block_size: int
    spans: tuple[Span, ...]
    fallback: Fallback
    _index: dict[bytes, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.peer_id: i for i, s in enumerate(self.spans)})

    def span_of(self, peer_id: bytes) -> Span:
        """The span ``peer_id`` reduces; raises ``KeyError`` for a peer not in the group."""
        return self.spans[self._index[peer_id]]

    @property
    def reducers(self) -> tuple[bytes, ...]:
        """Peers with a non-empty span, in peer id order."""
        return tuple(s.peer_id for s in self.spans if s.size)

    def chunks(self, peer_id: bytes, max_chunk: int) -> tuple[Chunk, ...]:
        span = self.span_of(peer_id)
        return split_chunks(span.start, span.end, max_chunk, self.block_size)


def partition(
    n_elements: int,
    peers: Iterable[PeerBandwidth],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_bandwidth_fraction: float = DEFAULT_MIN_BANDWIDTH_FRACTION,
) -> Partition:
    """Partition ``[0, n_elements)`` among ``peers`` (see the module docstring for the rule).

    Raises ``ValueError`` for an empty group, a duplicate peer id, a negative or non-finite
    bandwidth, or out-of-range sizes: announcements are validated on the wire before they
    get here, so these are local bugs.
    """
    if n_elements < 0:
        raise ValueError(f"n_elements must be >= 0, got {n_elements}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not (math.isfinite(min_bandwidth_fraction) and 0.0 <= min_bandwidth_fraction <= 1.0):
        raise ValueError(f"min_bandwidth_fraction must be in [0, 1], got {min_bandwidth_fraction}")
    ordered = sorted(peers, key=lambda p: p.peer_id)
    if not ordered:
        raise ValueError("cannot partition among zero peers")
    for prev, cur in itertools.pairwise(ordered):
        if prev.peer_id == cur.peer_id:
            raise ValueError(f"duplicate peer id {cur.peer_id.hex()}")
    for p in ordered:
        if not (math.isfinite(p.bandwidth) and p.bandwidth >= 0.0):
            raise ValueError(f"peer {p.peer_id.hex()}: invalid bandwidth {p.bandwidth!r}")

    weights, fallback = _weights(ordered, min_bandwidth_fraction)
    bounds = _boundaries(n_elements, weights, block_size)
    spans = tuple(
        Span(p.peer_id, start, end)
        for p, start, end in zip(ordered, bounds, bounds[1:], strict=False)
    )
    return Partition(n_elements, block_size, spans, fallback)


def split_chunks(start: int, end: int, max_chunk: int, block_size: int = 1) -> tuple[Chunk, ...]:
    """Split ``[start, end)`` into chunks of at most ``max_chunk`` elements.

    The chunk length is ``max_chunk`` rounded down to a multiple of ``block_size``, so chunks
    that start on a block boundary stay on one; every chunk is full except the last.
    """
    if not 0 <= start <= end:
        raise ValueError(f"invalid range [{start}, {end})")
    if block_size < 1 or max_chunk < block_size:
        raise ValueError(f"max_chunk ({max_chunk}) must be >= block_size ({block_size}) >= 1")
    step = max_chunk - max_chunk % block_size
    return tuple(Chunk(i, s, min(s + step, end)) for i, s in enumerate(range(start, end, step)))


def _weights(ordered: list[PeerBandwidth], min_fraction: float) -> tuple[list[Fraction], Fallback]:
    fallback = Fallback.NONE
    candidates = [p.accepts_connections for p in ordered]
    if not any(candidates):
        fallback |= Fallback.RELAYED
        candidates = [True] * len(ordered)
    best = max(p.bandwidth for p, c in zip(ordered, candidates, strict=True) if c)
    if best == 0.0:
        return [Fraction(int(c)) for c in candidates], fallback | Fallback.EQUAL
    threshold = Fraction(min_fraction) * Fraction(best)
    weights = [
        Fraction(p.bandwidth) if c and Fraction(p.bandwidth) >= threshold else Fraction(0)
        for p, c in zip(ordered, candidates, strict=True)
    ]
    return weights, fallback


def _boundaries(n: int, weights: list[Fraction], block: int) -> list[int]:
    total = sum(weights, Fraction(0))
    bounds = [0]
    running = Fraction(0)
    for w in weights:
        running += w
        ideal = Fraction(n) * running / total
        # Allowed boundaries are the multiples of block below n, and n itself: take the
        # nearest, ties upward. Neighbours are at most one block apart, so the error is at
        # most half a block.
        lower = math.floor(ideal / block) * block
        upper = min(lower + block, n)
        bounds.append(upper if ideal - lower >= upper - ideal else lower)
    return bounds
