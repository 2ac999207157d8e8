"""NAT-PMP (RFC 6886) messages, sans-IO.

Requests go to the gateway's UDP port 5351 and the answer comes back from that port. Every
decoder checks the reply against the request it answers, so a stray or late datagram is refused
(``ProtocolViolation`` with ``UNEXPECTED``) instead of being taken for the answer.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from dandelion_p2p.errors import ProtocolViolation, RejectCode, RemoteRejected

SERVER_PORT = 5351
VERSION = 0
OP_PUBLIC_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 0x80
MAX_REPLY = 1100  # far above any valid reply; bounds what we read from the socket

_PROTOCOL_OPS = {"UDP": OP_MAP_UDP, "TCP": OP_MAP_TCP}
_HEADER = struct.Struct(">BBHI")  # version, opcode, result code, seconds since epoch
_PUBLIC_ADDRESS_REPLY = struct.Struct(">BBHI4s")
_MAP_REQUEST = struct.Struct(">BBHHHI")
_MAP_REPLY = struct.Struct(">BBHIHHI")


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


MEANINGS: dict[int, str] = {
    ResultCode.SUCCESS: "success",
    ResultCode.UNSUPPORTED_VERSION: "the gateway does not speak this protocol version",
    ResultCode.NOT_AUTHORIZED: "the gateway refuses (mapping disabled or not allowed)",
    ResultCode.NETWORK_FAILURE: "the gateway has no external address yet",
    ResultCode.OUT_OF_RESOURCES: "the gateway cannot create more mappings",
    ResultCode.UNSUPPORTED_OPCODE: "the gateway does not know this request",
}


@dataclass(frozen=True, slots=True)
class PublicAddressReply:
    epoch: int
    external_ip: str


@dataclass(frozen=True, slots=True)
class MapReply:
    protocol: str
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def _check_port(port: int, what: str, *, zero_ok: bool) -> None:
    if not (0 if zero_ok else 1) <= port <= 0xFFFF:
        raise ValueError(f"{what} {port} is out of range")


def encode_public_address_request() -> bytes:
    return bytes([VERSION, OP_PUBLIC_ADDRESS])


def encode_map_request(protocol: str, internal_port: int, external_port: int,
                       lifetime: int) -> bytes:
    """A mapping request; ``lifetime=0`` deletes (then ``external_port`` must be 0)."""
    op = _PROTOCOL_OPS.get(protocol)
    if op is None:
        raise ValueError(f"protocol must be TCP or UDP, got {protocol!r}")
    # Internal port 0 with lifetime 0 would delete every mapping this host has: never send it.
    _check_port(internal_port, "internal port", zero_ok=False)
    _check_port(external_port, "external port", zero_ok=True)
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} is out of range")
    if lifetime == 0 and external_port != 0:
        raise ValueError("a deletion must suggest external port 0 (RFC 6886 section 3.4)")
    return _MAP_REQUEST.pack(VERSION, op, 0, internal_port, external_port, lifetime)


def _check_header(data: bytes, expected_op: int) -> int:
    """Validate version/opcode, raise for an error result; returns the epoch."""
    if len(data) < _HEADER.size:
        raise ProtocolViolation(RejectCode.MALFORMED, f"NAT-PMP reply of {len(data)} bytes")
    version, op, result, epoch = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolViolation(RejectCode.UNSUPPORTED_VERSION, f"NAT-PMP version {version}")
    if op != RESPONSE_BIT | expected_op:
        raise ProtocolViolation(RejectCode.UNEXPECTED, f"NAT-PMP reply opcode {op}")
    if result != ResultCode.SUCCESS:
        raise RemoteRejected(result, "NAT-PMP: " + MEANINGS.get(result, "unknown result code"))
    return int(epoch)


def decode_public_address_reply(data: bytes) -> PublicAddressReply:
    """Parse a reply to ``encode_public_address_request``.

    Raises ``ProtocolViolation`` for a malformed or foreign datagram and ``RemoteRejected``
    when the gateway answered with an error code.
    """
    epoch = _check_header(data, OP_PUBLIC_ADDRESS)
    if len(data) < _PUBLIC_ADDRESS_REPLY.size:
        raise ProtocolViolation(RejectCode.MALFORMED, f"public address reply of {len(data)} bytes")
    *_, raw_ip = _PUBLIC_ADDRESS_REPLY.unpack_from(data)
    return PublicAddressReply(epoch, str(ipaddress.IPv4Address(raw_ip)))


def decode_map_reply(data: bytes, protocol: str, internal_port: int) -> MapReply:
    """Parse the reply to a mapping request for (``protocol``, ``internal_port``).

    Raises ``ProtocolViolation`` for a malformed datagram or one answering another request,
    ``RemoteRejected`` for an error code.
    """
    op = _PROTOCOL_OPS.get(protocol)
    if op is None:
        raise ValueError(f"protocol must be TCP or UDP, got {protocol!r}")
    epoch = _check_header(data, op)
    if len(data) < _MAP_REPLY.size:
        raise ProtocolViolation(RejectCode.MALFORMED, f"mapping reply of {len(data)} bytes")
    _, _, _, _, got_internal, external, lifetime = _MAP_REPLY.unpack_from(data)
    if got_internal != internal_port:
        raise ProtocolViolation(RejectCode.UNEXPECTED,
                                f"reply is for internal port {got_internal}, not {internal_port}")
    if lifetime != 0 and external == 0:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "mapping granted on external port 0")
    return MapReply(protocol, epoch, got_internal, external, lifetime)
