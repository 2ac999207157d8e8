"""The chunk protocol without I/O (spec: protocol/dataset.md section 3).

The serving end: ``chunk_to_serve`` turns a request into the chunk to send or the reject it
earns, and ``ServeSlots`` bounds the chunks being sent at once, per peer, per network prefix
and in total. The fetching end: ``ChunkReceiver`` checks the header and every part as they
arrive and the hash at the end, so a truncated, padded or altered chunk never passes.
``transfer_deadline`` is the time a whole transfer may take; keeping it, and moving the
frames, is ``transfer``'s job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import blake3

from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES, check_chunk_name
from dandelion_p2p.dataset.messages import ChunkHeader, ChunkPart, GetChunk
from dandelion_p2p.errors import ProtocolViolation, RejectCode, RemoteRejected
from dandelion_p2p.wire import Message, Reject

MIN_RATE = 256 * 1024
"""Bytes per second a whole transfer must average, on top of ``DEADLINE_GRACE``: a peer
trickling a byte just inside the per-part timeout would otherwise hold a fetch or a serve slot
for days."""
DEADLINE_GRACE = 30.0
MIN_PART_BYTES = 64 * 1024
"""Every part but the last carries at least this much (senders use ``PART_BYTES``)."""
MAX_CONCURRENT_SERVES = 8
MAX_SERVES_PER_PEER = 2
MAX_SERVES_PER_PREFIX = 4
"""Chunks sent at once to the peers of one public network (``networks.public_network_of``):
identities are free, so two per peer alone would let one host with many keys take every slot."""

ChunkSource = Callable[[str], Path | bytes | None]
"""A chunk's file, or bytes held in memory (the signed manifest), or None when not held."""


class LargerThanExpected(ProtocolViolation):
    """The holder announced more bytes than the fetcher expected: a violation only when the
    expectation came from the signed manifest, not from a caller that may be wrong."""


def transfer_deadline(size: int, *, min_rate: float = MIN_RATE,
                      grace: float = DEADLINE_GRACE) -> float:
    """Seconds a transfer of ``size`` bytes may take in all."""
    return size / min_rate + grace


# ---- the serving end -------------------------------------------------------------------------


def chunk_to_serve(msg: Message, source: ChunkSource) -> tuple[str, Path | bytes]:
    """The chunk request ``msg`` asks for: its name and where its bytes are.

    A name that is not a chunk name never reaches ``source`` (so never the file system).

    Raises ``ProtocolViolation``: ``UNKNOWN_TYPE`` for a message other than ``GetChunk``,
    ``INVALID_FIELD`` for a bad name, ``NOT_FOUND`` for a chunk not held.
    """
    if not isinstance(msg, GetChunk):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected GetChunk")
    name = check_chunk_name(msg.chunk)
    held = source(name)
    if held is None:
        raise ProtocolViolation(RejectCode.NOT_FOUND, f"chunk {name} is not here")
    return name, held




@dataclass(frozen=True, slots=True)
class ServeLimits:
    total: int = MAX_CONCURRENT_SERVES
    per_peer: int = MAX_SERVES_PER_PEER
    per_prefix: int = MAX_SERVES_PER_PREFIX


class ServeSlots:
    """The chunks being sent now: per peer, per network prefix and in total."""

    def __init__(self, limits: ServeLimits | None = None) -> None:
        self.limits = limits or ServeLimits()
        self.in_use = 0
        self._by_peer: Counter[bytes] = Counter()
        self._by_prefix: Counter[str] = Counter()

    def take(self, peer: bytes, prefix: str | None) -> None:
        """Take a slot to send ``peer`` (of network ``prefix``, None if unknown) a chunk.

        Raises ``ProtocolViolation(RATE_LIMITED)`` when a limit is reached; nothing is taken
        then. Every slot taken must be given back.
        """
        limits = self.limits
        if self._by_peer[peer] >= limits.per_peer:
            raise ProtocolViolation(
                RejectCode.RATE_LIMITED, f"already sending you {limits.per_peer} chunks"
            )
        if prefix is not None and self._by_prefix[prefix] >= limits.per_prefix:
            raise ProtocolViolation(
                RejectCode.RATE_LIMITED,
                f"already sending {limits.per_prefix} chunks to peers of your network",
            )
        if self.in_use >= limits.total:
            raise ProtocolViolation(RejectCode.RATE_LIMITED, "serving too many chunks")
        self.in_use += 1
        self._by_peer[peer] += 1
        if prefix is not None:
            self._by_prefix[prefix] += 1

    def give_back(self, peer: bytes, prefix: str | None) -> None:
        self.in_use -= 1
        _decrement(self._by_peer, peer)
        if prefix is not None:
            _decrement(self._by_prefix, prefix)

    def held_by(self, peer: bytes) -> int:
        return self._by_peer[peer]


K = TypeVar("K")


def _decrement(counts: Counter[K], key: K) -> None:
    # Entries at zero are dropped: a peer that once fetched must not stay in memory.
    if counts[key] > 1:
        counts[key] -= 1
    else:
        del counts[key]


# ---- the fetching end ------------------------------------------------------------------------


class ChunkReceiver:
    """The fetching end of one transfer of chunk ``name``: its header, its parts, its hash.

    Refuses an announced size over ``expected_size`` (default: the largest chunk), more bytes
    than announced, a short part before the last, and bytes that do not hash to ``name``.

    Raises (from each method): ``RemoteRejected`` for a ``Reject``; ``LargerThanExpected`` for
    an announced size over the expectation; ``ProtocolViolation`` for anything else the sender
    did wrong (the fetcher scores it and asks another holder).
    """

    def __init__(self, name: str, expected_size: int | None = None) -> None:
        self.name = check_chunk_name(name)
        self.limit = expected_size if expected_size is not None else MAX_CHUNK_BYTES
        self.size: int | None = None
        """The size the holder announced, once its header arrived."""
        self._hasher = blake3.blake3()
        self._received = bytearray()

    def receive_header(self, msg: Message) -> int:
        """Accept the holder's first reply; returns the announced size."""
        if isinstance(msg, Reject):
            raise RemoteRejected(msg.code, msg.detail)
        if not isinstance(msg, ChunkHeader) or msg.chunk != self.name:
            raise ProtocolViolation(RejectCode.UNEXPECTED, "expected the header of that chunk")
        if msg.size > self.limit:
            raise LargerThanExpected(
                RejectCode.TOO_LARGE, f"chunk of {msg.size} bytes, expected at most {self.limit}"
            )
        self.size = msg.size
        return msg.size

    @property
    def complete(self) -> bool:
        return self.size is not None and len(self._received) >= self.size

    def receive_part(self, msg: Message) -> None:
        if self.size is None:
            raise RuntimeError("a part before the header was accepted")
        if not isinstance(msg, ChunkPart):
            raise ProtocolViolation(RejectCode.UNEXPECTED, "expected a ChunkPart")
        got = len(self._received) + len(msg.data)
        if got > self.size:
            raise ProtocolViolation(RejectCode.TOO_LARGE, "more bytes than announced")
        if len(msg.data) < MIN_PART_BYTES and got < self.size:
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD,
                f"a part of {len(msg.data)} bytes (at least {MIN_PART_BYTES} but the last)",
            )
        self._hasher.update(msg.data)
        self._received += msg.data

    def result(self) -> bytes:
        """The chunk's bytes, once ``complete``, checked against its name."""
        if not self.complete:
            raise RuntimeError("the chunk is not complete")
        if self._hasher.hexdigest() != self.name:
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD, f"chunk bytes do not hash to {self.name[:12]}..."
            )
        return bytes(self._received)
