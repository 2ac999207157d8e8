"""Credit-based flow control over sealed frames, sans-IO.

``ChannelCore`` is one end of a channel as a state machine: it seals what we send, opens what
we receive, and keeps the credit books. The async ``Channel`` moves its bytes.

Why credit: libp2p's yamux fails a writer whose reader stops reading for more than 5 s, and a
TCP writer blocked on a full socket cannot tell a slow consumer from a dead peer. So each
receiver keeps reading its transport at all times into a bounded buffer, and the bound is
enforced by the sender: it sends a data frame only against credit (frames and bytes) that the
receiver granted, and the receiver grants more as its consumer takes frames. A frame beyond the
granted credit is a protocol violation, so a peer cannot make us buffer more than we offered.

Control frames (the header's control bit set) carry:

* ``CREDIT``: ``0x01 | frames (u32) | bytes (u64)``, big-endian, increments to the sender's
  allowance. The first frame each side sends is a CREDIT with its whole window.
* ``CLOSE``: ``0x02``; the sender will send nothing more and will read nothing more. Anything
  after it is a violation. A transport that ends without a CLOSE was cut off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.sealing import (
    LABEL_ACCEPTOR,
    LABEL_OPENER,
    MAX_CONTROL_PAYLOAD,
    Buffer,
    FrameOpener,
    FrameSealer,
    SealedFrame,
    SessionKeys,
    sealed_size,
)
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.wire import RejectCode

Role = Literal["opener", "acceptor"]

CONTROL_CREDIT = 0x01
CONTROL_CLOSE = 0x02
_CREDIT = struct.Struct(">BIQ")
_CLOSE = bytes([CONTROL_CLOSE])

DEFAULT_WINDOW_FRAMES = 64
# A sender's allowance beyond these is no window any honest receiver would offer.
MAX_CREDIT_FRAMES = 2**32 - 1
MAX_CREDIT_BYTES = 2**40
# Credit is returned once the consumer has taken this fraction of the window, batching grants
# into few control frames. With the window at least twice the largest frame, an idle consumer
# always leaves the sender at least 3/4 of the window, so no frame can wait for a grant that
# is never sent.
GRANT_FRACTION = 4

assert _CREDIT.size <= MAX_CONTROL_PAYLOAD


@dataclass(frozen=True, slots=True)
class Data:
    payload: bytes | SealedFrame
    """Opened bytes, or a large frame to open with ``ChannelCore.open`` / ``open_into``."""

    @property
    def size(self) -> int:
        return self.payload.size if isinstance(self.payload, SealedFrame) else len(self.payload)


@dataclass(frozen=True, slots=True)
class Credit:
    frames: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer sent CLOSE."""


Event = Data | Credit | Closed


def default_window(max_frame: int) -> int:
    return max(2 * max_frame, 32 * 1024 * 1024)


class ChannelCore:
    """One end of a sealed, credit-controlled channel.

    ``window_bytes`` and ``window_frames`` bound what the peer may have sent and we have not
    yet handed to the consumer; ``send_max_frame`` is the peer's limit on our frames.
    """

    def __init__(
        self,
        sealer: FrameSealer,
        opener: FrameOpener,
        *,
        send_max_frame: int,
        window_bytes: int | None = None,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
    ) -> None:
        receive_max = opener.max_frame
        window = default_window(receive_max) if window_bytes is None else window_bytes
        if window < 2 * receive_max:
            raise ValueError("window_bytes must be at least twice the largest frame received")
        if not 2 <= window_frames <= MAX_CREDIT_FRAMES or window > MAX_CREDIT_BYTES:
            raise ValueError("window out of range")
        self.sealer = sealer
        self.opener = opener
        opener.check_header = self._check_header
        # Enough pooled frame buffers to refill the whole window without allocating.
        opener.pool_limit = window + receive_max
        self.send_max_frame = send_max_frame
        self.window_bytes = window
        self.window_frames = window_frames
        # What we may still send.
        self.send_frames = 0
        self.send_bytes = 0
        # What the peer may still send (granted, not yet used).
        self.recv_frames = 0
        self.recv_bytes = 0
        # Taken by our consumer, not yet granted back; the whole window at the start.
        self._ungranted_frames = window_frames
        self._ungranted_bytes = window
        self.remote_closed = False
        self.local_closed = False
        self._peeked: Event | None = None

    @classmethod
    def for_session(
        cls,
        keys: SessionKeys,
        role: Role,
        *,
        receive_max_frame: int,
        send_max_frame: int,
        window_bytes: int | None = None,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
    ) -> ChannelCore:
        if role == "opener":
            send = (keys.opener_to_acceptor, LABEL_OPENER)
            receive = (keys.acceptor_to_opener, LABEL_ACCEPTOR)
        else:
            send = (keys.acceptor_to_opener, LABEL_ACCEPTOR)
            receive = (keys.opener_to_acceptor, LABEL_OPENER)
        return cls(
            FrameSealer(*send),
            FrameOpener(*receive, receive_max_frame),
            send_max_frame=send_max_frame,
            window_bytes=window_bytes,
            window_frames=window_frames,
        )

    # ---- sending ----------------------------------------------------------------------------

    def can_send(self, n: int) -> bool:
        return self.send_frames >= 1 and self.send_bytes >= n

    def check_can_send(self) -> None:
        """Raise ``ChannelClosed`` if no data frame may be sent any more."""
        if self.local_closed:
            raise ChannelClosed("the channel is closed")
        if self.remote_closed:
            raise ChannelClosed("the peer closed the channel")

    @staticmethod
    def frame_size(n: int) -> int:
        return sealed_size(n)

    def seal_data_into(self, out: bytearray | memoryview, payload: Buffer) -> int:
        """Seal a data frame into ``out`` and spend its credit; returns the sealed size.

        Raises ``ValueError`` for an empty or oversized frame and ``RuntimeError`` without
        credit: both are the caller's bugs, which ``can_send`` and ``send_max_frame`` prevent.
        """
        n = len(payload)
        self.check_can_send()
        if not 0 < n <= self.send_max_frame:
            raise ValueError(f"frame of {n} bytes outside 1..{self.send_max_frame}")
        if not self.can_send(n):
            raise RuntimeError("no credit for this frame; wait for can_send()")
        size = self.sealer.seal_into(out, payload)
        self.send_frames -= 1
        self.send_bytes -= n
        return size

    def seal_data(self, payload: Buffer) -> bytes:
        out = bytearray(sealed_size(len(payload)))
        self.seal_data_into(out, payload)
        return bytes(out)

    def grant_due(self) -> bool:
        if self.local_closed:
            return False
        return (
            self._ungranted_bytes * GRANT_FRACTION >= self.window_bytes
            or self._ungranted_frames * GRANT_FRACTION >= self.window_frames
        )

    def take_grant(self) -> bytes | None:
        """A CREDIT frame returning what the consumer took, or ``None`` if there is nothing."""
        if self.local_closed or (self._ungranted_frames == 0 and self._ungranted_bytes == 0):
            return None
        frames, nbytes = self._ungranted_frames, self._ungranted_bytes
        frame = self.sealer.seal(_CREDIT.pack(CONTROL_CREDIT, frames, nbytes), control=True)
        self.recv_frames += frames
        self.recv_bytes += nbytes
        self._ungranted_frames = self._ungranted_bytes = 0
        return frame

    def seal_close(self) -> bytes:
        """The CLOSE frame; afterwards nothing more is sealed."""
        if self.local_closed:
            raise ChannelClosed("the channel is closed")
        frame = self.sealer.seal(_CLOSE, control=True)
        self.local_closed = True
        return frame

    # ---- receiving --------------------------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        self.opener.feed(data)

    def receive_buffer(self) -> memoryview:
        return self.opener.receive_buffer()

    def commit(self, n: int) -> None:
        self.opener.commit(n)

    def _check_header(self, control: bool, n: int) -> None:
        if self.remote_closed:
            raise ProtocolViolation(RejectCode.UNEXPECTED, "frame after CLOSE")
        if not control and (self.recv_frames < 1 or n > self.recv_bytes):
            raise ProtocolViolation(
                RejectCode.UNEXPECTED,
                f"data frame of {n} bytes beyond the granted credit "
                f"({self.recv_frames} frames, {self.recv_bytes} bytes)",
            )

    def next_event(self) -> Event | None:
        """The next event from received bytes; ``None`` until a frame is complete.

        Raises:
            ProtocolViolation: tampering, bad lengths, frames beyond credit or after CLOSE,
                unknown or malformed control frames.
        """
        if self._peeked is not None:
            event, self._peeked = self._peeked, None
            return event
        frame = self.opener.next_frame()
        if frame is None:
            return None
        if isinstance(frame, SealedFrame):
            self.recv_frames -= 1
            self.recv_bytes -= frame.size
            return Data(frame)
        payload = frame.payload
        if not frame.control:
            self.recv_frames -= 1
            self.recv_bytes -= len(payload)
            return Data(payload)
        kind = payload[0]
        if kind == CONTROL_CREDIT and len(payload) == _CREDIT.size:
            _, frames, nbytes = _CREDIT.unpack(payload)
            self.send_frames += frames
            self.send_bytes += nbytes
            if self.send_frames > MAX_CREDIT_FRAMES or self.send_bytes > MAX_CREDIT_BYTES:
                raise ProtocolViolation(RejectCode.INVALID_FIELD, "credit beyond any window")
            return Credit(frames, nbytes)
        if kind == CONTROL_CLOSE and len(payload) == 1:
            self.remote_closed = True
            return Closed()
        raise ProtocolViolation(
            RejectCode.UNKNOWN_TYPE, f"unknown control frame {kind} of {len(payload)} bytes"
        )

    def peek_event(self) -> bool:
        """Whether an event is ready, keeping it for ``next_event``. Raises as that does."""
        if self._peeked is None:
            self._peeked = self.next_event()
        return self._peeked is not None

    def open(self, payload: bytes | SealedFrame) -> bytes:
        """The plaintext of a received data frame; a sealed one's buffer goes back to the pool.

        Raises:
            ProtocolViolation: a sealed frame failed authentication.
        """
        if not isinstance(payload, SealedFrame):
            return payload
        try:
            return self.opener.open(payload)
        finally:
            self.opener.recycle(payload)

    def open_into(self, payload: bytes | SealedFrame, out: bytearray | memoryview) -> int:
        """Write the plaintext of a received data frame into ``out``; returns its size.

        Raises:
            ValueError: ``out`` is too small (nothing is consumed).
            ProtocolViolation: a sealed frame failed authentication.
        """
        if not isinstance(payload, SealedFrame):
            n = len(payload)
            if len(out) < n:
                raise ValueError(f"buffer of {len(out)} bytes cannot hold a frame of {n}")
            out[:n] = payload
            return n
        if len(out) < payload.size:
            raise ValueError(f"buffer of {len(out)} bytes cannot hold a frame of {payload.size}")
        try:
            return self.opener.open_into(payload, out)
        finally:
            self.opener.recycle(payload)

    def consumed(self, n: int) -> bool:
        """The consumer took a data frame of ``n`` bytes; True when a grant is now due."""
        self._ungranted_frames += 1
        self._ungranted_bytes += n
        return self.grant_due()

    def end_of_stream(self) -> None:
        """The transport ended.

        Raises:
            PeerUnavailable: it ended inside a frame, or on a boundary but without CLOSE (a
                peer that died looks exactly like that).
        """
        self.opener.end_of_stream()
        if not self.remote_closed:
            raise PeerUnavailable("the peer's stream ended without CLOSE (cut off or crashed)")
