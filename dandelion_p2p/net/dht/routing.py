"""Kademlia routing table without I/O: k-buckets by XOR distance, with replacement caches."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dht.records import node_key

KEY_BITS = 256


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


@dataclass
class Contact:
    peer_id: bytes
    addrs: tuple[str, ...]
    key: bytes
    last_seen: float

    def ref(self) -> PeerRef:
        return PeerRef(peer_id=self.peer_id, addrs=self.addrs)


class RoutingTable:
    """Peers known to serve the DHT, bucketed by the length of their distance to us.

    A full bucket keeps its long-lived contacts (they are the most likely to stay online) and
    holds newcomers in a bounded replacement cache, promoted when a contact fails.
    """

    def __init__(self, local_peer_id: bytes, *, k: int = 20, replacements: int = 8) -> None:
        self.local_peer_id = local_peer_id
        self.local_key = node_key(local_peer_id)
        self.k = k
        self.replacements = replacements
        self._buckets: list[OrderedDict[bytes, Contact]] = [
            OrderedDict() for _ in range(KEY_BITS)
        ]
        self._spare: list[OrderedDict[bytes, Contact]] = [OrderedDict() for _ in range(KEY_BITS)]

    def _index(self, key: bytes) -> int:
        return max(distance(self.local_key, key).bit_length() - 1, 0)

    def update(self, peer_id: bytes, addrs: tuple[str, ...], now: float) -> bool:
        """Record that ``peer_id`` answered or asked us. Returns whether it is in the table."""
        if peer_id == self.local_peer_id:
            return False
        key = node_key(peer_id)
        index = self._index(key)
        bucket = self._buckets[index]
        contact = bucket.get(peer_id)
        if contact is not None:
            contact.last_seen = now
            if addrs:
                contact.addrs = addrs
            bucket.move_to_end(peer_id)
            return True
        if len(bucket) < self.k:
            bucket[peer_id] = Contact(peer_id, addrs, key, now)
            return True
        spare = self._spare[index]
        spare[peer_id] = Contact(peer_id, addrs, key, now)
        spare.move_to_end(peer_id)
        while len(spare) > self.replacements:
            spare.popitem(last=False)
        return False

    def remove(self, peer_id: bytes) -> None:
        """Forget a contact that failed; the newest replacement takes its place."""
        index = self._index(node_key(peer_id))
        bucket = self._buckets[index]
        if bucket.pop(peer_id, None) is not None:
            spare = self._spare[index]
            if spare:
                replacement_id, replacement = spare.popitem(last=True)
                bucket[replacement_id] = replacement
        else:
            self._spare[index].pop(peer_id, None)

    def get(self, peer_id: bytes) -> Contact | None:
        return self._buckets[self._index(node_key(peer_id))].get(peer_id)

    def nearest(self, target: bytes, count: int, exclude: bytes | None = None) -> list[Contact]:
        contacts = [c for bucket in self._buckets for c in bucket.values() if c.peer_id != exclude]
        target_int = int.from_bytes(target, "big")
        contacts.sort(key=lambda c: int.from_bytes(c.key, "big") ^ target_int)
        return contacts[:count]

    def contacts(self) -> list[Contact]:
        return [c for bucket in self._buckets for c in bucket.values()]

    def stale_buckets(self, now: float, max_age: float) -> list[int]:
        """Indices of non-empty buckets none of whose contacts was seen within ``max_age``."""
        return [
            i
            for i, bucket in enumerate(self._buckets)
            if bucket and max(c.last_seen for c in bucket.values()) < now - max_age
        ]

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets)

    def __contains__(self, peer_id: bytes) -> bool:
        return self.get(peer_id) is not None
