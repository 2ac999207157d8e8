"""Which chunks this server delivered to which peer, so that a receipt counts only for a chunk
its signer really downloaded from us.

Bounded in memory: at most ``max_per_peer`` chunks remembered per peer and ``max_total`` in
all, the oldest forgotten first. A forgotten delivery costs an honest peer one more download
of the chunk (its client fetches it again before handing in the receipt), never a lost
receipt. Kept in memory, not in the lease book: after a restart peers download once more.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_DELIVERIES_PER_PEER = 64
"""Chunks remembered per peer: far more than the leases one peer may hold at once."""

MAX_DELIVERIES_TOTAL = 65_536
"""Chunks remembered in all (about 10 MB at most)."""


class DeliveryLog:
    """(peer, chunk) pairs this server sent up to their last part, oldest first."""

    def __init__(
        self, *, max_per_peer: int = MAX_DELIVERIES_PER_PEER,
        max_total: int = MAX_DELIVERIES_TOTAL,
    ) -> None:
        if max_per_peer < 1 or max_total < 1:
            raise ValueError("delivery bounds must be positive")
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self._all: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        self._per_peer: dict[bytes, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def record(self, peer: bytes, chunk: str) -> None:
        """``chunk`` was sent to ``peer`` (its last part is on its way)."""
        key = (peer, chunk)
        chunks = self._per_peer.setdefault(peer, OrderedDict())
        if key in self._all:
            self._all.move_to_end(key)
            chunks.move_to_end(chunk)
            return
        self._all[key] = None
        chunks[chunk] = None
        if len(chunks) > self.max_per_peer:
            self._forget(peer, next(iter(chunks)))
        while len(self._all) > self.max_total:
            oldest_peer, oldest_chunk = next(iter(self._all))
            self._forget(oldest_peer, oldest_chunk)

    def delivered(self, peer: bytes, chunk: str) -> bool:
        return (peer, chunk) in self._all

    def held_for(self, peer: bytes) -> int:
        return len(self._per_peer.get(peer, ()))

    def _forget(self, peer: bytes, chunk: str) -> None:
        self._all.pop((peer, chunk), None)
        chunks = self._per_peer.get(peer)
        if chunks is None:
            return
        chunks.pop(chunk, None)
        if not chunks:
            del self._per_peer[peer]
