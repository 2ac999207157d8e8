"""Kademlia routing table without I/O: k-buckets by XOR distance, with replacement caches, and
a bound on the contacts one network may hold.

Identities are free, so an attacker can mint peer ids that fall into any bucket and crowd the
contacts near a key (an eclipse). Networks are not free: a bucket takes at most
``max_per_network_in_bucket`` contacts of one public network and the whole table at most
``max_per_network``. Contacts of no known public network (loopback, LAN, a peer whose address
is not an IP) are not counted: peers on one host or one LAN are not strangers."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dht.records import node_key

KEY_BITS = 256


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


# Two per bucket and 16 per table, per /24 or /48: a few honest peers behind one NAT fit,
# a Sybil farm on one network holds a sliver of any bucket.
DEFAULT_MAX_PER_NETWORK_IN_BUCKET = 2
DEFAULT_MAX_PER_NETWORK = 16


@dataclass
class Contact:
    peer_id: bytes
    addrs: tuple[str, ...]
    key: bytes
    last_seen: float
    network: str | None = None
    """The public network this contact counts for (``networks.public_network_of``)."""

    def ref(self) -> PeerRef:
        return PeerRef(peer_id=self.peer_id, addrs=self.addrs)


class RoutingTable:
    """Peers known to serve the DHT, bucketed by the length of their distance to us.

    A full bucket keeps its long-lived contacts (they are the most likely to stay online) and
    holds newcomers in a bounded replacement cache, promoted when a contact fails.
    """

    def __init__(
        self,
        local_peer_id: bytes,
        *,
        k: int = 20,
        replacements: int = 8,
        max_per_network_in_bucket: int = DEFAULT_MAX_PER_NETWORK_IN_BUCKET,
        max_per_network: int = DEFAULT_MAX_PER_NETWORK,
    ) -> None:
        self.local_peer_id = local_peer_id
        self.local_key = node_key(local_peer_id)
        self.k = k
        self.replacements = replacements
        self.max_per_network_in_bucket = max_per_network_in_bucket
        self.max_per_network = max_per_network
        self._per_network: dict[str, int] = {}
        self._buckets: list[OrderedDict[bytes, Contact]] = [
            OrderedDict() for _ in range(KEY_BITS)
        ]
        self._spare: list[OrderedDict[bytes, Contact]] = [OrderedDict() for _ in range(KEY_BITS)]

    def _index(self, key: bytes) -> int:
        return max(distance(self.local_key, key).bit_length() - 1, 0)

    def update(
        self, peer_id: bytes, addrs: tuple[str, ...], now: float, network: str | None = None
    ) -> bool:
        """Record that ``peer_id`` answered or asked us; ``network`` is the public network it
        counts for (None: not counted). Returns whether it is in the table. A newcomer whose
        network holds its share of the bucket or the table waits in the replacement cache."""
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
        newcomer = Contact(peer_id, addrs, key, now, network)
        if len(bucket) < self.k and self._has_room(bucket, network):
            self._insert(bucket, newcomer)
            return True
        spare = self._spare[index]
        spare[peer_id] = newcomer
        spare.move_to_end(peer_id)
        while len(spare) > self.replacements:
            spare.popitem(last=False)
        return False

    def _has_room(self, bucket: OrderedDict[bytes, Contact], network: str | None) -> bool:
        if network is None:
            return True
        if self._per_network.get(network, 0) >= self.max_per_network:
            return False
        in_bucket = sum(1 for c in bucket.values() if c.network == network)
        return in_bucket < self.max_per_network_in_bucket

    def _insert(self, bucket: OrderedDict[bytes, Contact], contact: Contact) -> None:
        bucket[contact.peer_id] = contact
        if contact.network is not None:
            self._per_network[contact.network] = self._per_network.get(contact.network, 0) + 1

    def _forget(self, contact: Contact) -> None:
        if contact.network is None:
            return
        left = self._per_network.get(contact.network, 0) - 1
        if left > 0:
            self._per_network[contact.network] = left
        else:
            self._per_network.pop(contact.network, None)

    def remove(self, peer_id: bytes) -> None:
        """Forget a contact that failed; the newest replacement whose network has room takes
        its place."""
        index = self._index(node_key(peer_id))
        bucket = self._buckets[index]
        gone = bucket.pop(peer_id, None)
        if gone is not None:
            self._forget(gone)
            spare = self._spare[index]
            for replacement_id in reversed(list(spare)):
                replacement = spare[replacement_id]
                if self._has_room(bucket, replacement.network):
                    del spare[replacement_id]
                    self._insert(bucket, replacement)
                    break
        else:
            self._spare[index].pop(peer_id, None)

    def networks(self) -> dict[str, int]:
        """Contacts per counted public network."""
        return dict(self._per_network)

    def get(self, peer_id: bytes) -> Contact | None:
        return self._buckets[self._index(node_key(peer_id))].get(peer_id)

    def nearest(self, target: bytes, count: int, exclude: bytes | None = None) -> list[Contact]:
        contacts = (c for bucket in self._buckets for c in bucket.values() if c.peer_id != exclude)
        target_int = int.from_bytes(target, "big")
        # A partial sort: readers ask for the few nearest of a table of hundreds on every poll.
        return heapq.nsmallest(count, contacts,
                               key=lambda c: int.from_bytes(c.key, "big") ^ target_int)

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
