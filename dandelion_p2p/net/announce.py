"""What a peer publishes about itself in the DHT, and the namespaces the network core serves."""

from __future__ import annotations

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.net.dht.messages import MAX_ADDR_LEN, MAX_ADDRS
from dandelion_p2p.net.dht.records import NamespacePolicy, RecordValidator
from dandelion_p2p.wire import Message, Registry, RejectCode, decode, encode, invalid

VALUES = Registry("values")

PEER_NAMESPACE = "peer"
"""Key: the publisher's peer id. The one place to find how to reach a given peer."""
MEMBERS_NAMESPACE = "members"
"""Key: a network name. Every peer of that network publishes its announcement under it."""
RELAYS_NAMESPACE = "relays"
"""Key: a network name. Relays of that network publish themselves under it."""

ANNOUNCEMENT_TTL = 600.0
MAX_TTL_MS = 3_600_000
ROLE_RELAY = "relay"
ROLE_DHT_SERVER = "dht-server"
KNOWN_ROLES = frozenset({ROLE_RELAY, ROLE_DHT_SERVER, "dataset", "trainer"})


@VALUES.message(1)
class PeerAnnouncement(Message):
    """How to reach a peer: direct addresses (if reachable) and relayed circuit addresses."""

    addrs: tuple[str, ...]
    reachable: bool
    roles: tuple[str, ...] = ()
    agent: str = ""

    def check(self) -> None:
        if len(self.addrs) > MAX_ADDRS:
            raise invalid(f"PeerAnnouncement: more than {MAX_ADDRS} addresses")
        if any(not a or len(a) > MAX_ADDR_LEN for a in self.addrs):
            raise invalid("PeerAnnouncement: empty or over-long address")
        if len(self.roles) > 8 or any(r not in KNOWN_ROLES for r in self.roles):
            raise invalid("PeerAnnouncement: unknown role")
        if len(self.agent) > 64:
            raise invalid("PeerAnnouncement: agent longer than 64 characters")


def encode_announcement(announcement: PeerAnnouncement) -> bytes:
    return encode(announcement)


def decode_announcement(value: bytes) -> PeerAnnouncement:
    msg = decode(value, VALUES)
    if not isinstance(msg, PeerAnnouncement):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "value is not a PeerAnnouncement")
    return msg


def check_announcement(value: bytes) -> None:
    decode_announcement(value)


def register_core_namespaces(validator: RecordValidator) -> None:
    policy = NamespacePolicy(max_ttl_ms=MAX_TTL_MS, check_value=check_announcement)
    validator.register(
        PEER_NAMESPACE,
        NamespacePolicy(max_ttl_ms=MAX_TTL_MS, owner_only=True, check_value=check_announcement),
    )
    validator.register(MEMBERS_NAMESPACE, policy)
    validator.register(RELAYS_NAMESPACE, policy)
