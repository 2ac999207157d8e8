"""Signed records: creation, validation by namespace policy, and the bounded local store.

A record is identified by (namespace, key, publisher): several publishers may hold records
under one key (for example everyone announcing readiness for an averaging round), and each
publisher's newest sequence number wins. Validation runs on every put received and again on
every record read back from the network.
"""

from __future__ import annotations

import hashlib
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


@dataclass
class RecordValidator:
    policies: dict[str, NamespacePolicy] = field(default_factory=dict)

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
        if not verify_by_peer(record.publisher, record.signed_bytes(), record.signature):
            raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "record signature does not verify")
        if policy.check_value is not None:
            policy.check_value(record.value)

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


class LocalRecordStore:
    """Records this node holds as a DHT server, bounded per key and in total; expired ones
    are dropped. (The DHT as a whole, seen by its users, is ``net.ports.RecordStore``.)"""

    def __init__(self, *, max_keys: int = 65_536, max_publishers_per_key: int = 1024) -> None:
        self.max_keys = max_keys
        self.max_publishers_per_key = max_publishers_per_key
        self._by_key: dict[bytes, dict[bytes, SignedRecord]] = {}

    def put(self, record: SignedRecord, now_ms: int) -> bool:
        """Store a validated record. Returns False when an identical copy is already stored.

        Raises ``ProtocolViolation``: ``STALE`` when a newer sequence number is held,
        ``RATE_LIMITED`` when the store is full.
        """
        rkey = routing_key(record.namespace, record.key)
        slot = self._by_key.get(rkey)
        if slot is None:
            if len(self._by_key) >= self.max_keys:
                self.purge(now_ms)
                if len(self._by_key) >= self.max_keys:
                    raise ProtocolViolation(RejectCode.RATE_LIMITED, "record store is full")
            slot = self._by_key[rkey] = {}
        current = slot.get(record.publisher)
        if current is not None and current.expires_at_ms > now_ms:
            if current == record:
                return False
            if not newer(record, current):
                raise ProtocolViolation(
                    RejectCode.STALE, f"seq {record.seq} is not newer than stored {current.seq}"
                )
        elif len(slot) >= self.max_publishers_per_key:
            self._purge_slot(slot, now_ms)
            if len(slot) >= self.max_publishers_per_key:
                raise ProtocolViolation(RejectCode.RATE_LIMITED, "too many publishers for key")
        slot[record.publisher] = record
        return True

    def get(self, rkey: bytes, now_ms: int) -> list[SignedRecord]:
        slot = self._by_key.get(rkey)
        if not slot:
            return []
        return [r for r in slot.values() if r.expires_at_ms > now_ms]

    def _purge_slot(self, slot: dict[bytes, SignedRecord], now_ms: int) -> None:
        for publisher in [p for p, r in slot.items() if r.expires_at_ms <= now_ms]:
            del slot[publisher]

    def purge(self, now_ms: int) -> int:
        """Drop expired records; returns how many were dropped."""
        dropped = 0
        for rkey in list(self._by_key):
            slot = self._by_key[rkey]
            before = len(slot)
            self._purge_slot(slot, now_ms)
            dropped += before - len(slot)
            if not slot:
                del self._by_key[rkey]
        return dropped

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._by_key.values())


def merge_newest(records: list[SignedRecord]) -> list[SignedRecord]:
    """One record per (namespace, key, publisher): the highest sequence number."""
    best: dict[tuple[str, bytes, bytes], SignedRecord] = {}
    for r in records:
        ident = (r.namespace, r.key, r.publisher)
        held = best.get(ident)
        if held is None or newer(r, held):
            best[ident] = r
    return list(best.values())
