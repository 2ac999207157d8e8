"""Length-prefixed framing, sans-IO.

A frame is a 4-byte big-endian unsigned length followed by that many payload bytes. The
length is checked against the receiver's limit as soon as the 4 header bytes arrive, so an
oversized frame is refused before a single payload byte is buffered. A zero length is invalid.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from dandelion_p2p.errors import ProtocolViolation, RejectCode

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
ABSOLUTE_MAX_FRAME = 64 * 1024 * 1024


def encode_frame(payload: bytes, max_size: int) -> bytes:
    """Prefix ``payload`` with its length; refuses what the receiver would refuse."""
    if not payload:
        raise ValueError("empty frame")
    if len(payload) > max_size:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the limit of {max_size}")
    return HEADER.pack(len(payload)) + payload


def check_length(length: int, max_size: int) -> None:
    if length == 0:
        raise ProtocolViolation(RejectCode.MALFORMED, "zero-length frame")
    if length > max_size:
        raise ProtocolViolation(
            RejectCode.TOO_LARGE, f"frame of {length} bytes exceeds the limit of {max_size}"
        )


class FrameDecoder:
    """Feed bytes in, take complete frames out. Raises ``ProtocolViolation`` on bad lengths."""

    def __init__(self, max_size: int) -> None:
        if not 0 < max_size <= ABSOLUTE_MAX_FRAME:
            raise ValueError(f"max_size must be in 1..{ABSOLUTE_MAX_FRAME}")
        self.max_size = max_size
        self._buffer = bytearray()
        self._expected: int | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self._expected is None and len(self._buffer) >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(self._buffer)
            check_length(length, self.max_size)
            self._expected = length

    def frames(self) -> Iterator[bytes]:
        """Yield every frame completed so far."""
        while True:
            if self._expected is None:
                if len(self._buffer) < HEADER_SIZE:
                    return
                (length,) = HEADER.unpack_from(self._buffer)
                check_length(length, self.max_size)
                self._expected = length
            end = HEADER_SIZE + self._expected
            if len(self._buffer) < end:
                return
            frame = bytes(self._buffer[HEADER_SIZE:end])
            del self._buffer[:end]
            self._expected = None
            yield frame

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame (non-zero at EOF = truncation)."""
        return len(self._buffer)
