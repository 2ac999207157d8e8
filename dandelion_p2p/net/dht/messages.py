"""Messages of the ``dht`` protocol family (spec: protocol/dht.md)."""

from __future__ import annotations

from dandelion_p2p.identity import MAX_PEER_ID_SIZE
from dandelion_p2p.wire import Message, Registry, invalid
from dandelion_p2p.wire.signed import SignedMessage

DHT = Registry("dht")

PROTOCOL_ID = "/dandelion/dht/1.1.0"
"""Requests in turn on one stream (``net.request_streams``)."""
PROTOCOL_ID_ONE_PER_STREAM = "/dandelion/dht/1.0.0"
"""One request per stream: still served, and offered after 1.1.0."""
MAX_FRAME = 256 * 1024
KEY_SIZE = 32
MAX_ADDRS = 16
MAX_ADDR_LEN = 300
MAX_NAMESPACE = 32
MAX_RECORD_KEY = 128
MAX_VALUE = 8 * 1024
MAX_PEERS_PER_REPLY = 32
MAX_RECORDS_PER_REPLY = 64


def check_peer_id(peer_id: bytes, where: str) -> None:
    if not 2 <= len(peer_id) <= MAX_PEER_ID_SIZE:
        raise invalid(f"{where}: peer id of {len(peer_id)} bytes")


@DHT.message(1)
class PeerRef(Message):
    """A peer and the addresses it can be dialed on."""

    peer_id: bytes
    addrs: tuple[str, ...] = ()

    def check(self) -> None:
        check_peer_id(self.peer_id, "PeerRef.peer_id")
        if len(self.addrs) > MAX_ADDRS:
            raise invalid(f"PeerRef: {len(self.addrs)} addresses, at most {MAX_ADDRS}")
        if any(not a or len(a) > MAX_ADDR_LEN for a in self.addrs):
            raise invalid("PeerRef: empty or over-long address")


@DHT.message(2)
class SignedRecord(SignedMessage):
    """A record as stored and returned; ``signature`` covers every other field (section 4)."""

    SIGNING_DOMAIN = b"dandelion/record/v1"

    namespace: str
    key: bytes
    value: bytes
    publisher: bytes
    seq: int
    expires_at_ms: int
    signature: bytes

    def check(self) -> None:
        if not 0 < len(self.namespace) <= MAX_NAMESPACE:
            raise invalid("SignedRecord.namespace: empty or too long")
        if len(self.key) > MAX_RECORD_KEY:
            raise invalid(f"SignedRecord.key: longer than {MAX_RECORD_KEY} bytes")
        if len(self.value) > MAX_VALUE:
            raise invalid(f"SignedRecord.value: longer than {MAX_VALUE} bytes")
        check_peer_id(self.publisher, "SignedRecord.publisher")
        if not 0 <= self.seq < 2**63:
            raise invalid("SignedRecord.seq out of range")
        if not 0 < self.expires_at_ms < 2**53:
            raise invalid("SignedRecord.expires_at_ms out of range")
        if len(self.signature) != 64:
            raise invalid("SignedRecord.signature must be 64 bytes")


def _check_target(target: bytes, where: str) -> None:
    if len(target) != KEY_SIZE:
        raise invalid(f"{where}.target must be {KEY_SIZE} bytes")


@DHT.message(3)
class FindNode(Message):
    """Ask for the peers closest to ``target``. ``sender`` is set by DHT servers only."""

    target: bytes
    sender: PeerRef | None = None

    def check(self) -> None:
        _check_target(self.target, "FindNode")


@DHT.message(4)
class Nodes(Message):
    closer: tuple[PeerRef, ...]

    def check(self) -> None:
        if len(self.closer) > MAX_PEERS_PER_REPLY:
            raise invalid(f"Nodes: more than {MAX_PEERS_PER_REPLY} peers")


@DHT.message(5)
class GetRecords(Message):
    """Ask for the records stored under ``target`` and for closer peers."""

    target: bytes
    sender: PeerRef | None = None

    def check(self) -> None:
        _check_target(self.target, "GetRecords")


@DHT.message(6)
class Records(Message):
    records: tuple[SignedRecord, ...]
    closer: tuple[PeerRef, ...]

    def check(self) -> None:
        if len(self.records) > MAX_RECORDS_PER_REPLY:
            raise invalid(f"Records: more than {MAX_RECORDS_PER_REPLY} records")
        if len(self.closer) > MAX_PEERS_PER_REPLY:
            raise invalid(f"Records: more than {MAX_PEERS_PER_REPLY} peers")


@DHT.message(7)
class PutRecord(Message):
    record: SignedRecord
    sender: PeerRef | None = None


@DHT.message(8)
class PutAck(Message):
    """The record is stored (or an identical copy already was)."""

    stored: bool = True
