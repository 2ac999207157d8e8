"""Signed records: creation, validation by namespace policy, and the bounded local store.

A record is identified by (namespace, key, publisher): several publishers may hold records
under one key (for example everyone announcing readiness for an averaging round), and each
publisher's newest sequence number wins. Validation runs on every put received and again on
every record read back from the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import verify_by_peer
from dandelion_p2p.net.dht.messages import SignedRecord
from dandelion_p2p.net.ports import Signer
from dandelion_p2p.wire import RejectCode

# Clocks of strangers disagree; a record may claim an expiry this far past its namespace's TTL.
CLOCK_SKEW_MS = 60_000
# What ``SignedRecord.check`` accepts as a signature until ``signed_with`` replaces it.
_UNSIGNED = bytes(64)


def routing_key(namespace: str, key: bytes) -> bytes:
    """Where in the keyspace a record lives."""
    return hashlib.sha256(namespace.encode() + b"\x00" + key).digest()


def node_key(peer_id: bytes) -> bytes:
    """Where in the keyspace a peer lives."""
    return hashlib.sha256(peer_id).digest()


def sign_record(
    signer: Signer, namespace: str, key: bytes, value: bytes, seq: int, expires_at_ms: int
) -> SignedRecord:
    unsigned = SignedRecord(
        namespace=namespace,
        key=key,
        value=value,
        publisher=signer.peer_id_bytes,
        seq=seq,
        expires_at_ms=expires_at_ms,
        signature=_UNSIGNED,
    )
    return unsigned.signed_with(signer.sign)


ValueCheck = Callable[[bytes], None]


@dataclass(frozen=True)
class NamespacePolicy:
    """Who may write a namespace, for how long, and what its values must look like."""

    max_ttl_ms: int
    owner_only: bool = False
    """The key must be the publisher's own peer id (e.g. a peer's address record)."""
    check_value: ValueCheck | None = None
    """Raises ``ProtocolViolation`` for a value that does not decode as this namespace's type."""


VERIFIED_KEPT = 4096
"""Signatures a validator remembers having verified (32 bytes each): the same record comes back
from every replica a read asks, and from every read of a key."""


@dataclass
class RecordValidator:
    policies: dict[str, NamespacePolicy] = field(default_factory=dict)
    _verified: dict[bytes, None] = field(default_factory=dict, repr=False)
    """Digests of (signed bytes, signature) that verified, oldest first."""

    def register(self, namespace: str, policy: NamespacePolicy) -> None:
        self.policies[namespace] = policy

    def validate(self, record: SignedRecord, now_ms: int) -> None:
        """Raises ``ProtocolViolation`` (with the reject code) for a record we must not keep."""
        policy = self.policies.get(record.namespace)
        if policy is None:
            # Not a fault: a newer peer may publish a namespace this version does not know.
            raise ProtocolViolation(
                RejectCode.NOT_FOUND, f"namespace {record.namespace!r} is not served here"
            )
        if record.expires_at_ms <= now_ms:
            raise ProtocolViolation(RejectCode.EXPIRED, "record has expired")
        if record.expires_at_ms > now_ms + policy.max_ttl_ms + CLOCK_SKEW_MS:
            raise ProtocolViolation(
                RejectCode.EXPIRED,
                f"record expires more than {policy.max_ttl_ms // 1000} s from now",
            )
        if policy.owner_only and record.key != record.publisher:
            raise ProtocolViolation(
                RejectCode.FORBIDDEN, f"only the owner may publish under {record.namespace!r}"
            )
        if not self._verifies(record):
            raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "record signature does not verify")
        if policy.check_value is not None:
            policy.check_value(record.value)

    def _verifies(self, record: SignedRecord) -> bool:
        signed = record.signed_bytes()
        # The digest covers everything the signature does (the publisher is in the signed
        # bytes), so a record that differs anywhere is checked afresh.
        sig = record.signature
        seen = hashlib.blake2b(len(sig).to_bytes(2, "big") + sig + signed, digest_size=32).digest()
        if seen in self._verified:
            return True
        if not verify_by_peer(record.publisher, signed, sig):
            return False
        if len(self._verified) >= VERIFIED_KEPT:
            del self._verified[next(iter(self._verified))]
        self._verified[seen] = None
        return True

    def is_valid(self, record: SignedRecord, now_ms: int) -> bool:
        try:
            self.validate(record, now_ms)
        except ProtocolViolation:
            return False
        return True


NamespaceRegistration = Callable[[RecordValidator], None]
"""A feature's function that registers its DHT namespaces on a node's validator, so the network
layer serves a feature's records without knowing the feature."""


def newer(candidate: SignedRecord, current: SignedRecord) -> bool:
    """Whether ``candidate`` should replace ``current`` from the same publisher."""
    return candidate.seq > current.seq


@dataclass(frozen=True)
class Source:
    """Who made us hold a record: the storing peer and the network its connection came from.

    Quotas are kept per peer and per network, because a peer id costs nothing to make while
    addresses in many networks do not.
    """

    peer: bytes
    network: str


# Our own records, and nothing else, are exempt from the per-source quotas.
LOCAL_SOURCE = Source(peer=b"", network="local")
# Records a lookup of ours brought back (read repair) share one network: however many
# publishers sign them, together they get one network's share.
READ_BACK_NETWORK = "read-back"




# Field bytes plus what the store spends around a record (dict entries, the object).
RECORD_OVERHEAD = 256


def stored_size(record: SignedRecord) -> int:
    return (
        len(record.namespace) + len(record.key) + len(record.value) + len(record.publisher)
        + len(record.signature) + RECORD_OVERHEAD
    )


@dataclass(frozen=True)
class StoreLimits:
    """What remote peers can make one node hold as a DHT server (documented in
    protocol/dht.md, "Store limits")."""

    max_bytes: int = 64 * 1024 * 1024
    max_keys: int = 65_536
    max_publishers_per_key: int = 1024
    per_peer_records: int = 256
    per_peer_bytes: int = 1024 * 1024
    per_network_records: int = 2048
    per_network_bytes: int = 8 * 1024 * 1024
    per_peer_publishers_per_key: int = 16
    per_network_publishers_per_key: int = 64


@dataclass(frozen=True)
class StoredRecord:
    record: SignedRecord
    source: Source
    size: int
    stored_at_ms: int


_Slot = tuple[bytes, bytes]  # (routing key, publisher)


@dataclass
class _Usage:
    records: int = 0
    bytes: int = 0
    slots: dict[_Slot, None] = field(default_factory=dict)  # insertion order: oldest first


class LocalRecordStore:
    """Records this node holds as a DHT server, bounded per key, per storing peer, per
    storing network and in bytes overall; expired ones are dropped. (The DHT as a whole, seen
    by its users, is ``net.ports.RecordStore``.)

    When full, the store makes room by evicting from the network that holds the most, and
    only when that network holds more than the newcomer's: a flood from one network can
    displace its own records, never push out the others'.
    """

    def __init__(
        self,
        limits: StoreLimits | None = None,
        *,
        max_keys: int | None = None,
        max_publishers_per_key: int | None = None,
    ) -> None:
        limits = limits or StoreLimits()
        if max_keys is not None:
            limits = dataclasses.replace(limits, max_keys=max_keys)
        if max_publishers_per_key is not None:
            limits = dataclasses.replace(limits, max_publishers_per_key=max_publishers_per_key)
        self.limits = limits
        self._by_key: dict[bytes, dict[bytes, StoredRecord]] = {}
        self._by_peer: dict[str, _Usage] = {}
        self._by_network: dict[str, _Usage] = {}
        self.total_bytes = 0

    # ---- accounting ----------------------------------------------------------------------

    def _account(self, rkey: bytes, stored: StoredRecord, sign: int) -> None:
        slot = (rkey, stored.record.publisher)
        self.total_bytes += sign * stored.size
        for table, name in (
            (self._by_peer, stored.source.peer.hex()),
            (self._by_network, stored.source.network),
        ):
            usage = table.setdefault(name, _Usage())
            usage.records += sign
            usage.bytes += sign * stored.size
            if sign > 0:
                usage.slots[slot] = None
            else:
                usage.slots.pop(slot, None)
                if usage.records <= 0:
                    del table[name]

    def _remove(self, rkey: bytes, publisher: bytes) -> None:
        slot = self._by_key.get(rkey)
        if slot is None or publisher not in slot:
            return
        self._account(rkey, slot.pop(publisher), -1)
        if not slot:
            del self._by_key[rkey]

    def usage_of_network(self, network: str) -> tuple[int, int]:
        """(records, bytes) held for a storing network."""
        usage = self._by_network.get(network)
        return (0, 0) if usage is None else (usage.records, usage.bytes)

    def usage_of_peer(self, peer: bytes) -> tuple[int, int]:
        usage = self._by_peer.get(peer.hex())
        return (0, 0) if usage is None else (usage.records, usage.bytes)

    # ---- quotas --------------------------------------------------------------------------

    def _check_source_quota(
        self, source: Source, size: int, replacing: StoredRecord | None
    ) -> None:
        if source == LOCAL_SOURCE:
            return
        lim = self.limits
        for usage, max_records, max_bytes, what in (
            (self._by_peer.get(source.peer.hex()), lim.per_peer_records,
             lim.per_peer_bytes, "peer"),
            (self._by_network.get(source.network), lim.per_network_records,
             lim.per_network_bytes, "network"),
        ):
            if usage is None:
                continue
            records, used = usage.records, usage.bytes
            if replacing is not None and (
                replacing.source.peer == source.peer if what == "peer"
                else replacing.source.network == source.network
            ):
                records, used = records - 1, used - replacing.size
            if records + 1 > max_records or used + size > max_bytes:
                raise ProtocolViolation(
                    RejectCode.RATE_LIMITED, f"storing {what} is over its record quota"
                )

    def _check_key_share(self, slot: dict[bytes, StoredRecord], source: Source) -> None:
        if source == LOCAL_SOURCE:
            return
        by_peer = sum(1 for s in slot.values() if s.source.peer == source.peer)
        by_network = sum(1 for s in slot.values() if s.source.network == source.network)
        if by_peer >= self.limits.per_peer_publishers_per_key:
            raise ProtocolViolation(RejectCode.RATE_LIMITED, "peer holds its share of this key")
        if by_network >= self.limits.per_network_publishers_per_key:
            raise ProtocolViolation(RejectCode.RATE_LIMITED, "network holds its share of this key")

    def _evict_for(self, source: Source, within: bytes | None) -> bool:
        """Evict the oldest record of the network holding the most (within one key's slot
        when ``within`` is given), if it holds more than ``source``'s network. Returns
        whether anything was evicted."""
        if within is not None:
            counts: dict[str, int] = {}
            for s in self._by_key.get(within, {}).values():
                counts[s.source.network] = counts.get(s.source.network, 0) + 1
        else:
            counts = {name: u.bytes for name, u in self._by_network.items()}
        counts.pop(LOCAL_SOURCE.network, None)
        if not counts:
            return False
        biggest = max(counts, key=lambda name: counts[name])
        if biggest == source.network or counts[biggest] <= counts.get(source.network, 0):
            return False
        usage = self._by_network[biggest]
        for rkey, publisher in usage.slots:
            if within is None or rkey == within:
                self._remove(rkey, publisher)
                return True
        return False

    # ---- storing and reading -------------------------------------------------------------

    def put(self, record: SignedRecord, now_ms: int, source: Source = LOCAL_SOURCE) -> bool:
        """Store a validated record. Returns False when an identical copy is already stored.

        Raises ``ProtocolViolation``: ``STALE`` when a newer sequence number is held,
        ``RATE_LIMITED`` when the store, the key or the source's quota is full.
        """
        rkey = routing_key(record.namespace, record.key)
        size = stored_size(record)
        slot = self._by_key.get(rkey)
        current = slot.get(record.publisher) if slot is not None else None
        if current is not None and current.record.expires_at_ms > now_ms:
            if current.record == record:
                return False
            if not newer(record, current.record):
                raise ProtocolViolation(
                    RejectCode.STALE,
                    f"seq {record.seq} is not newer than stored {current.record.seq}",
                )
        self._check_source_quota(source, size, current)
        if slot is None:
            if len(self._by_key) >= self.limits.max_keys:
                self.purge(now_ms)
                if len(self._by_key) >= self.limits.max_keys and not self._evict_for(source, None):
                    raise ProtocolViolation(RejectCode.RATE_LIMITED, "record store is full")
        elif current is None:
            self._purge_slot(rkey, now_ms)
            slot = self._by_key.get(rkey)
            if slot is not None:
                self._check_key_share(slot, source)
                if len(slot) >= self.limits.max_publishers_per_key and not self._evict_for(
                    source, rkey
                ):
                    raise ProtocolViolation(RejectCode.RATE_LIMITED, "too many publishers for key")
        freed = current.size if current is not None else 0
        while self.total_bytes - freed + size > self.limits.max_bytes:
            if self.purge(now_ms) == 0 and not self._evict_for(source, None):
                raise ProtocolViolation(RejectCode.RATE_LIMITED, "record store is full")
        if current is not None:
            self._remove(rkey, record.publisher)
        stored = StoredRecord(record=record, source=source, size=size, stored_at_ms=now_ms)
        self._by_key.setdefault(rkey, {})[record.publisher] = stored
        self._account(rkey, stored, +1)
        return True

    def entries(self, rkey: bytes, now_ms: int) -> list[StoredRecord]:
        slot = self._by_key.get(rkey)
        if not slot:
            return []
        return [s for s in slot.values() if s.record.expires_at_ms > now_ms]

    def get(self, rkey: bytes, now_ms: int) -> list[SignedRecord]:
        return [s.record for s in self.entries(rkey, now_ms)]

    def _purge_slot(self, rkey: bytes, now_ms: int) -> int:
        slot = self._by_key.get(rkey, {})
        expired = [p for p, s in slot.items() if s.record.expires_at_ms <= now_ms]
        for publisher in expired:
            self._remove(rkey, publisher)
        return len(expired)

    def purge(self, now_ms: int) -> int:
        """Drop expired records; returns how many were dropped."""
        return sum(self._purge_slot(rkey, now_ms) for rkey in list(self._by_key))

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._by_key.values())


def diverse_selection(
    entries: list[StoredRecord],
    *,
    budget: int,
    max_count: int,
    size_of: Callable[[SignedRecord], int],
    rng: random.Random,
) -> list[SignedRecord]:
    """The records a reply carries when not all fit: one network at a time in turn (random
    order), the most recently refreshed first within each, random among equals. No expiry
    claim buys a place, and a network that stored many records gets no more turns than one
    that stored a few."""
    by_network: dict[str, list[StoredRecord]] = {}
    for s in entries:
        by_network.setdefault(s.source.network, []).append(s)
    queues: list[list[StoredRecord]] = []
    for group in by_network.values():
        rng.shuffle(group)
        group.sort(key=lambda s: s.stored_at_ms)  # stable: equals stay shuffled; newest last
        queues.append(group)
    rng.shuffle(queues)
    chosen: list[SignedRecord] = []
    used = 0
    while queues and len(chosen) < max_count:
        for queue in list(queues):
            if len(chosen) >= max_count:
                break
            record = queue.pop().record
            if not queue:
                queues.remove(queue)
            size = size_of(record)
            if used + size > budget:
                continue
            chosen.append(record)
            used += size
    return chosen


def merge_newest(records: list[SignedRecord]) -> list[SignedRecord]:
    """One record per (namespace, key, publisher): the highest sequence number."""
    best: dict[tuple[str, bytes, bytes], SignedRecord] = {}
    for r in records:
        ident = (r.namespace, r.key, r.publisher)
        held = best.get(ident)
        if held is None or newer(r, held):
            best[ident] = r
    return list(best.values())
