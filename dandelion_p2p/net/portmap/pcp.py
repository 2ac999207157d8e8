"""PCP (RFC 6887) MAP messages, sans-IO.

A MAP request is a 24-byte common header followed by 36 bytes of MAP data; addresses are
carried as 16 bytes, IPv4 in its IPv4-mapped IPv6 form. The gateway identifies a mapping by
(client address, protocol, internal port) and only lets the holder of its 96-bit nonce renew or
delete it, so the nonce travels with the mapping for its whole life.

A gateway that only speaks NAT-PMP answers a PCP request with a version-0 "unsupported
version" reply; ``decode_map_reply`` raises ``RemoteRejected`` with ``UNSUPP_VERSION`` for it
so the caller can fall back to NAT-PMP at once instead of timing out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from dandelion_p2p.errors import ProtocolViolation, RejectCode, RemoteRejected

SERVER_PORT = 5351
VERSION = 2
OP_MAP = 1
RESPONSE_BIT = 0x80
NONCE_SIZE = 12
MAX_MESSAGE = 1100  # RFC 6887 section 7: no PCP message is longer
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17}

_REQUEST_HEADER = struct.Struct(">BBHI16s")  # version, R|opcode, reserved, lifetime, client ip
# version, R|opcode, reserved, result, lifetime, epoch, reserved
_RESPONSE_HEADER = struct.Struct(">BBBBII12x")
_MAP = struct.Struct(">12sB3xHH16s")  # nonce, protocol, reserved, internal port, ext port, ext ip
HEADER_SIZE = _REQUEST_HEADER.size
MAP_MESSAGE_SIZE = HEADER_SIZE + _MAP.size
_ANY_IPV4 = ipaddress.IPv6Address("::ffff:0.0.0.0")


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


MEANINGS: dict[int, str] = {
    ResultCode.SUCCESS: "success",
    ResultCode.UNSUPP_VERSION: "the gateway does not speak this protocol version",
    ResultCode.NOT_AUTHORIZED: "the gateway refuses (not allowed, or the nonce does not match)",
    ResultCode.MALFORMED_REQUEST: "the gateway could not parse the request",
    ResultCode.UNSUPP_OPCODE: "the gateway does not support MAP",
    ResultCode.UNSUPP_OPTION: "the gateway does not support a mandatory option we sent",
    ResultCode.MALFORMED_OPTION: "an option in the request was malformed",
    ResultCode.NETWORK_FAILURE: "the gateway has no working external address right now",
    ResultCode.NO_RESOURCES: "the gateway cannot create more mappings now",
    ResultCode.UNSUPP_PROTOCOL: "the gateway cannot map this transport protocol",
    ResultCode.USER_EX_QUOTA: "this host has too many mappings on the gateway",
    ResultCode.CANNOT_PROVIDE_EXTERNAL: "the suggested external address or port is unavailable",
    ResultCode.ADDRESS_MISMATCH: "the gateway sees another source address than we claimed",
    ResultCode.EXCESSIVE_REMOTE_PEERS: "too many remote peers",
}


@dataclass(frozen=True, slots=True)
class MapReply:
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: str
    internal_port: int
    external_port: int
    external_ip: str


def encode_address(ip: str) -> bytes:
    """16-byte PCP form of an address: IPv4 as ``::ffff:a.b.c.d``."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed).packed
    return addr.packed


def decode_address(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def encode_map_request(*, nonce: bytes, protocol: str, internal_port: int, client_ip: str,
                       lifetime: int, external_port: int = 0,
                       external_ip: str | None = None) -> bytes:
    """A MAP request; ``lifetime=0`` deletes the mapping the nonce belongs to.

    ``external_port``/``external_ip`` are suggestions (0 / None: no preference).
    """
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    number = PROTOCOL_NUMBERS.get(protocol)
    if number is None:
        raise ValueError(f"protocol must be TCP or UDP, got {protocol!r}")
    if not 1 <= internal_port <= 0xFFFF:
        raise ValueError(f"internal port {internal_port} is out of range")
    if not 0 <= external_port <= 0xFFFF:
        raise ValueError(f"external port {external_port} is out of range")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} is out of range")
    suggested = encode_address(external_ip) if external_ip else _ANY_IPV4.packed
    header = _REQUEST_HEADER.pack(VERSION, OP_MAP, 0, lifetime, encode_address(client_ip))
    return header + _MAP.pack(nonce, number, internal_port, external_port, suggested)


def _check_options(data: bytes) -> None:
    """Walk the options after the MAP data; we act on none of them but refuse bad framing."""
    offset = MAP_MESSAGE_SIZE
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolViolation(RejectCode.MALFORMED, "truncated PCP option header")
        (length,) = struct.unpack_from(">H", data, offset + 2)
        # Option data is padded to a multiple of 4 bytes (RFC 6887 section 7.3).
        offset += 4 + (length + 3) // 4 * 4
        if offset > len(data):
            raise ProtocolViolation(RejectCode.MALFORMED, "PCP option runs past the message")


def decode_map_reply(data: bytes, *, nonce: bytes, protocol: str,
                     internal_port: int) -> MapReply:
    """Parse the reply to a MAP request carrying ``nonce``.

    Raises ``ProtocolViolation`` for a malformed datagram or one answering another request,
    ``RemoteRejected`` for an error result (including a NAT-PMP-only gateway's
    "unsupported version", as code ``UNSUPP_VERSION``).
    """
    if len(data) < 4:
        raise ProtocolViolation(RejectCode.MALFORMED, f"PCP reply of {len(data)} bytes")
    if len(data) > MAX_MESSAGE:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"PCP reply of {len(data)} bytes")
    version, op = data[0], data[1]
    if version == 0:
        # RFC 6886 section 3.5: a NAT-PMP server answers any other version this way.
        result = int.from_bytes(data[2:4], "big")
        if op & RESPONSE_BIT and result == ResultCode.UNSUPP_VERSION:
            raise RemoteRejected(ResultCode.UNSUPP_VERSION, "gateway speaks NAT-PMP, not PCP")
        raise ProtocolViolation(RejectCode.UNEXPECTED, "NAT-PMP datagram in reply to PCP")
    if len(data) < HEADER_SIZE or len(data) % 4:
        raise ProtocolViolation(RejectCode.MALFORMED, f"PCP reply of {len(data)} bytes")
    version, op, _, result, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if op != RESPONSE_BIT | OP_MAP:
        raise ProtocolViolation(RejectCode.UNEXPECTED, f"PCP reply opcode {op:#x}")
    if version != VERSION:
        if result == ResultCode.UNSUPP_VERSION:
            raise RemoteRejected(result, f"gateway speaks PCP version {version}")
        raise ProtocolViolation(RejectCode.UNSUPPORTED_VERSION, f"PCP version {version}")
    if len(data) < MAP_MESSAGE_SIZE:
        # Only error replies may omit the MAP data, and without it we cannot tell whose error
        # it is; an error it is anyway.
        if result != ResultCode.SUCCESS:
            raise RemoteRejected(result, "PCP: " + MEANINGS.get(result, "unknown result code"))
        raise ProtocolViolation(RejectCode.MALFORMED, f"PCP MAP reply of {len(data)} bytes")
    got_nonce, number, got_internal, external_port, raw_ip = _MAP.unpack_from(data, HEADER_SIZE)
    if got_nonce != nonce:
        raise ProtocolViolation(RejectCode.UNEXPECTED, "PCP reply carries another nonce")
    if number != PROTOCOL_NUMBERS.get(protocol) or got_internal != internal_port:
        raise ProtocolViolation(RejectCode.UNEXPECTED, "PCP reply is for another mapping")
    if result != ResultCode.SUCCESS:
        raise RemoteRejected(result, "PCP: " + MEANINGS.get(result, "unknown result code"))
    _check_options(data)
    external_ip = decode_address(raw_ip)
    if lifetime != 0 and (external_port == 0 or ipaddress.ip_address(external_ip).is_unspecified):
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "PCP mapping without external address")
    return MapReply(lifetime, epoch, got_nonce, protocol, got_internal, external_port, external_ip)
