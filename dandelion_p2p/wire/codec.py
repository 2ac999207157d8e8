"""The msgpack envelope: ``[version, type, body]``.

Decoding assumes the frame length was already bounded by the framing layer; msgpack's own
limits are then set to the frame length so no field can claim more than the frame holds.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dandelion_p2p.errors import ProtocolViolation, RejectCode
from dandelion_p2p.wire.schema import Message, Registry

WIRE_VERSION = 1


def encode(msg: Message) -> bytes:
    return msgpack.packb([WIRE_VERSION, msg.TYPE, msg.to_body()], use_bin_type=True)


def _map_without_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # msgpack keeps the last of duplicate keys silently; another decoder may keep the first,
    # so two readers could see different messages in the same bytes.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate map key")
    return result


def unpack(data: bytes) -> Any:
    """msgpack-decode untrusted bytes; any failure is ``MALFORMED``."""
    n = len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_map_without_duplicate_keys,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolViolation(RejectCode.MALFORMED, f"undecodable msgpack: {exc}") from None


def decode(data: bytes, registry: Registry) -> Message:
    """Decode one envelope; raises ``ProtocolViolation`` with the matching reject code."""
    envelope = unpack(data)
    if not isinstance(envelope, list) or not envelope:
        raise ProtocolViolation(RejectCode.MALFORMED, "envelope must be [version, type, body]")
    # The version comes first and is checked before the shape, so a later version may change
    # the rest of the envelope and still be answered with UNSUPPORTED_VERSION.
    version = envelope[0]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolViolation(RejectCode.MALFORMED, "version must be an integer")
    if version != WIRE_VERSION:
        raise ProtocolViolation(
            RejectCode.UNSUPPORTED_VERSION, f"version {version}, we speak {WIRE_VERSION}"
        )
    if len(envelope) != 3:
        raise ProtocolViolation(RejectCode.MALFORMED, "envelope must be [version, type, body]")
    _, type_id, body = envelope
    if isinstance(type_id, bool) or not isinstance(type_id, int):
        raise ProtocolViolation(RejectCode.MALFORMED, "type must be an integer")
    cls = registry.types.get(type_id)
    if cls is None:
        raise ProtocolViolation(
            RejectCode.UNKNOWN_TYPE, f"type {type_id} is not a {registry.family} message"
        )
    return cls.from_body(body)
