"""Sans-IO wire format: message dataclasses, msgpack envelope, length-prefixed framing."""

from dandelion_p2p.errors import RejectCode, describe
from dandelion_p2p.wire.codec import WIRE_VERSION, decode, encode
from dandelion_p2p.wire.framing import FrameDecoder, encode_frame
from dandelion_p2p.wire.schema import Message, Registry, Reject, invalid

__all__ = [
    "WIRE_VERSION",
    "FrameDecoder",
    "Message",
    "Registry",
    "Reject",
    "RejectCode",
    "decode",
    "describe",
    "encode",
    "encode_frame",
    "invalid",
]
