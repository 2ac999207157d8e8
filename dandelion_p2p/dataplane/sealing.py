"""Sealed framing for the data plane, sans-IO: bytes in, authenticated frames out.

A sealed frame is a 4-byte big-endian header word followed by an AES-256-GCM ciphertext with
its 16-byte tag. Bit 31 of the word marks a control frame; bits 0-30 give the length of what
follows (ciphertext + tag). The whole header is the AEAD's associated data, so a flipped flag or
length fails authentication like a flipped payload byte.

Nonces are never sent: each direction has its own key and a 4-byte label, and the nonce of the
n-th frame in a direction is ``label || n`` (8-byte big-endian counter). A replayed, dropped or
reordered frame is therefore opened with the wrong nonce and fails authentication. After
2**64 frames the counter would wrap; the sealer refuses instead and the channel must close.

The receiver checks the length from the header against its limit before it buffers a single
payload byte, and ``end_of_stream`` tells a truncated stream (EOF inside a frame) apart from
one that ended on a frame boundary.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.wire import RejectCode

Buffer = bytes | bytearray | memoryview

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
TAG_SIZE = 16
KEY_SIZE = 32
SECRET_SIZE = 32
TICKET_SIZE = 16
LABEL_SIZE = 4
CONTROL_FLAG = 0x8000_0000
LENGTH_MASK = 0x7FFF_FFFF
MAX_COUNTER = 2**64 - 1

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
# Same ceiling as the control-plane framing: no peer may make us hold more than this at once.
ABSOLUTE_MAX_FRAME = 64 * 1024 * 1024
MIN_MAX_FRAME = 4096
# Control frames carry a few counters; anything longer is a violation, caught from the header.
MAX_CONTROL_PAYLOAD = 64

# Labels of the two directions; distinct keys already separate them, distinct labels keep a
# frame from one direction from ever opening in the other even under a key-derivation slip.
LABEL_OPENER = b"op>a"
LABEL_ACCEPTOR = b"ac>o"
KDF_INFO = b"dandelion/data/v1"

# Bytes read per call when the size of the next frame is not yet known.
READ_CHUNK = 256 * 1024
# Data frames at least this large are read into a buffer of their own and opened by the
# consumer; smaller ones are opened as they arrive, where a buffer per frame would cost more
# than it saves.
DIRECT_BODY_MIN = 64 * 1024
_INITIAL_BUFFER = 256 * 1024

# ``encrypt_into`` seals straight into a reusable send buffer and ``decrypt_into`` opens straight
# into the consumer's; versions of cryptography without them cost one more copy per frame.
_HAS_ENCRYPT_INTO = hasattr(AESGCM, "encrypt_into")
_HAS_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")


@dataclass(frozen=True, slots=True)
class SessionKeys:
    opener_to_acceptor: bytes
    acceptor_to_opener: bytes


def derive_keys(secret: bytes, ticket: bytes, opener: bytes, acceptor: bytes) -> SessionKeys:
    """Per-direction keys: HKDF-SHA256(ikm=secret, salt=ticket, info=label || ids), 64 bytes.

    Binding both peer ids means a session secret leaked to, or relayed by, a third peer does not
    give it keys for a channel under its own name.
    """
    if len(secret) != SECRET_SIZE or len(ticket) != TICKET_SIZE:
        raise ValueError("secret must be 32 bytes and ticket 16 bytes")
    if not opener or not acceptor or len(opener) > 0xFFFF or len(acceptor) > 0xFFFF:
        raise ValueError("peer ids must be 1..65535 bytes")
    info = (
        KDF_INFO
        + len(opener).to_bytes(2, "big")
        + opener
        + len(acceptor).to_bytes(2, "big")
        + acceptor
    )
    okm = HKDF(algorithm=SHA256(), length=2 * KEY_SIZE, salt=ticket, info=info).derive(secret)
    return SessionKeys(okm[:KEY_SIZE], okm[KEY_SIZE:])


def _nonce(label: bytes, counter: int) -> bytes:
    return label + counter.to_bytes(8, "big")


def sealed_size(payload_len: int) -> int:
    """Bytes on the wire for a payload of ``payload_len`` bytes."""
    return HEADER_SIZE + payload_len + TAG_SIZE


class FrameSealer:
    """Seals outgoing frames of one direction. Not thread-safe; one writer at a time."""

    def __init__(self, key: bytes, label: bytes, *, counter: int = 0) -> None:
        if len(key) != KEY_SIZE or len(label) != LABEL_SIZE:
            raise ValueError("key must be 32 bytes and label 4 bytes")
        if not 0 <= counter <= MAX_COUNTER + 1:
            raise ValueError("counter out of range")
        self._aead = AESGCM(key)
        self._label = label
        self._counter = counter

    @property
    def counter(self) -> int:
        """The counter the next frame will use."""
        return self._counter

    def _next_nonce(self) -> bytes:
        if self._counter > MAX_COUNTER:
            raise ChannelClosed("nonce counter exhausted; open a new channel")
        nonce = _nonce(self._label, self._counter)
        self._counter += 1
        return nonce

    @staticmethod
    def _header(payload_len: int, control: bool) -> bytes:
        if payload_len < 1:
            raise ValueError("empty frame")
        if payload_len > ABSOLUTE_MAX_FRAME:
            raise ValueError(f"frame of {payload_len} bytes exceeds {ABSOLUTE_MAX_FRAME}")
        word = payload_len + TAG_SIZE
        return HEADER.pack(word | CONTROL_FLAG if control else word)

    def seal_into(
        self, out: bytearray | memoryview, payload: Buffer, *, control: bool = False
    ) -> int:
        """Write the sealed frame at the start of ``out``; return its size.

        ``out`` must hold at least ``sealed_size(len(payload))`` bytes; reusing one buffer for
        every frame spares the page faults of a fresh multi-MiB allocation per frame.
        """
        n = len(payload)
        header = self._header(n, control)
        size = sealed_size(n)
        if len(out) < size:
            raise ValueError(f"output buffer of {len(out)} bytes cannot hold {size}")
        nonce = self._next_nonce()
        with memoryview(out) as view:
            view[:HEADER_SIZE] = header
            body = view[HEADER_SIZE:size]
            if _HAS_ENCRYPT_INTO:
                self._aead.encrypt_into(nonce, payload, header, body)
            else:
                body[:] = self._aead.encrypt(nonce, bytes(payload), header)
            body.release()
        return size

    def seal(self, payload: Buffer, *, control: bool = False) -> bytes:
        """The sealed frame as new bytes (small frames, tests)."""
        header = self._header(len(payload), control)
        nonce = self._next_nonce()
        return header + self._aead.encrypt(nonce, bytes(payload), header)


class OpenedFrame(NamedTuple):
    control: bool
    payload: bytes


@dataclass(eq=False, slots=True)
class SealedFrame:
    """A large data frame received whole but not yet opened.

    Opening is left to whoever consumes it, so the plaintext can be written straight into the
    consumer's own buffer (``FrameOpener.open_into``) instead of a fresh allocation.
    """

    counter: int
    header: bytes
    buffer: bytearray
    length: int
    """Bytes of ciphertext + tag at the start of ``buffer``."""

    @property
    def size(self) -> int:
        return self.length - TAG_SIZE


# Called with (control, payload length) as soon as a frame's header is read, before its body is
# buffered; raises ProtocolViolation to refuse the frame.
HeaderCheck = Callable[[bool, int], None]


class FrameOpener:
    """Reassembles and opens incoming frames of one direction.

    Bytes go in either with ``feed(data)`` (one copy) or, for sockets, by writing into the view
    returned by ``receive_buffer()`` and calling ``commit(n)``. Small frames pass through one
    staging bytearray that is compacted or grown as needed, so frames arriving in pieces cost
    linear, not quadratic, copying; they come out opened (``OpenedFrame``). A data frame of at
    least ``DIRECT_BODY_MIN`` bytes is read into a buffer of its own, taken from a pool, and
    comes out as a ``SealedFrame`` to be opened with ``open`` or ``open_into`` and handed back
    with ``recycle``: no per-frame allocation of MiBs, whose page faults cost more than AES.
    After a ``ProtocolViolation`` the opener stays failed.
    """

    def __init__(
        self,
        key: bytes,
        label: bytes,
        max_frame: int,
        *,
        counter: int = 0,
        check_header: HeaderCheck | None = None,
        pool_limit: int | None = None,
    ) -> None:
        if len(key) != KEY_SIZE or len(label) != LABEL_SIZE:
            raise ValueError("key must be 32 bytes and label 4 bytes")
        if not MIN_MAX_FRAME <= max_frame <= ABSOLUTE_MAX_FRAME:
            raise ValueError(f"max_frame must be in {MIN_MAX_FRAME}..{ABSOLUTE_MAX_FRAME}")
        self.max_frame = max_frame
        self.check_header = check_header
        self.pool_limit = 2 * max_frame if pool_limit is None else pool_limit
        self._aead = AESGCM(key)
        self._label = label
        self._counter = counter
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # Size (header included) of the staged frame whose header has been read, else None.
        self._frame_size: int | None = None
        self._control = False
        # The large frame being read into its own buffer, if any.
        self._body: bytearray | None = None
        self._body_header = b""
        self._body_length = 0
        self._body_filled = 0
        self._pool: list[bytearray] = []
        self._pooled = 0
        self._failed: ProtocolViolation | None = None

    @property
    def counter(self) -> int:
        """The counter the next frame must carry."""
        return self._counter

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return self._end - self._start + (self._body_filled if self._body is not None else 0)

    # ---- input ----------------------------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        with memoryview(data) as view:
            if self._body_missing():
                assert self._body is not None
                take = min(self._body_length - self._body_filled, len(view))
                self._body[self._body_filled : self._body_filled + take] = view[:take]
                self._body_filled += take
                rest = view[take:]
            else:
                rest = view
            n = len(rest)
            if n:
                # Anything left follows a body that is now complete.
                self._reserve(n)
                self._view[self._end : self._end + n] = rest
                self._end += n
            rest.release()

    def receive_buffer(self, size_hint: int = READ_CHUNK) -> memoryview:
        """Writable space for the next bytes: the rest of a large frame's own buffer, or free
        staging space of at least the rest of the current frame or ``size_hint`` bytes.

        Write into it, then call ``commit`` with the count before any other call: the view may
        belong to a buffer that is replaced by the next call.
        """
        if self._body_missing():
            assert self._body is not None
            return memoryview(self._body)[self._body_filled : self._body_length]
        want = size_hint
        if self._frame_size is not None:
            want = max(want, self._start + self._frame_size - self._end)
        self._reserve(want)
        return self._view[self._end :]

    def commit(self, n: int) -> None:
        if self._body_missing():
            if not 0 <= n <= self._body_length - self._body_filled:
                raise ValueError("commit beyond the frame")
            self._body_filled += n
            return
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError("commit beyond the receive buffer")
        self._end += n

    def _body_missing(self) -> bool:
        """Whether a large frame's own buffer still lacks bytes (and takes the next ones)."""
        return self._body is not None and self._body_filled < self._body_length

    def _reserve(self, n: int) -> None:
        capacity = len(self._buf)
        if capacity - self._end >= n:
            return
        used = self._end - self._start
        # Compact only when the kept bytes are at most half the buffer: each compaction then
        # frees at least as much as it copies, so copying stays linear in the bytes received.
        if used + n <= capacity and used <= capacity // 2:
            self._view[:used] = self._view[self._start : self._end]
        else:
            grown = bytearray(max(used + n, 2 * capacity))
            grown[:used] = self._view[self._start : self._end]
            self._view.release()
            self._buf = grown
            self._view = memoryview(grown)
        self._start = 0
        self._end = used

    # ---- output ---------------------------------------------------------------------------

    def next_frame(self) -> OpenedFrame | SealedFrame | None:
        """The next complete frame; ``None`` until one is complete.

        Raises:
            ProtocolViolation: bad length (from the header alone) or failed authentication.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._next_frame()
        except ProtocolViolation as exc:
            self._failed = exc
            raise

    def _next_frame(self) -> OpenedFrame | SealedFrame | None:
        if self._body is not None:
            if self._body_filled < self._body_length:
                return None
            sealed = SealedFrame(self._counter, self._body_header, self._body, self._body_length)
            self._counter += 1
            self._body = None
            return sealed
        start = self._start
        available = self._end - start
        if self._frame_size is None:
            if available < HEADER_SIZE:
                return None
            (word,) = HEADER.unpack_from(self._buf, start)
            control = bool(word & CONTROL_FLAG)
            length = word & LENGTH_MASK
            if length <= TAG_SIZE:
                raise ProtocolViolation(RejectCode.MALFORMED, "sealed frame with no payload")
            payload_len = length - TAG_SIZE
            limit = MAX_CONTROL_PAYLOAD if control else self.max_frame
            if payload_len > limit:
                raise ProtocolViolation(
                    RejectCode.TOO_LARGE,
                    f"{'control' if control else 'data'} frame of {payload_len} bytes "
                    f"exceeds the limit of {limit}",
                )
            if self._counter > MAX_COUNTER:
                raise ProtocolViolation(RejectCode.UNEXPECTED, "frame beyond the nonce space")
            if self.check_header is not None:
                self.check_header(control, payload_len)
            if not control and payload_len >= DIRECT_BODY_MIN:
                self._start_body(start, length, available - HEADER_SIZE)
                return self._next_frame()
            self._frame_size = HEADER_SIZE + length
            self._control = control
        size = self._frame_size
        if available < size:
            return None
        header = bytes(self._view[start : start + HEADER_SIZE])
        body = self._view[start + HEADER_SIZE : start + size]
        try:
            payload = self._aead.decrypt(_nonce(self._label, self._counter), body, header)
        except InvalidTag:
            raise self._auth_failure(self._counter) from None
        finally:
            body.release()
        self._counter += 1
        self._frame_size = None
        self._advance(size)
        return OpenedFrame(self._control, payload)

    def _start_body(self, start: int, length: int, staged: int) -> None:
        body = self._take_buffer(length)
        have = min(staged, length)
        body[:have] = self._view[start + HEADER_SIZE : start + HEADER_SIZE + have]
        self._body = body
        self._body_header = bytes(self._view[start : start + HEADER_SIZE])
        self._body_length = length
        self._body_filled = have
        self._advance(HEADER_SIZE + have)

    def _advance(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0

    def _auth_failure(self, counter: int) -> ProtocolViolation:
        return ProtocolViolation(
            RejectCode.BAD_SIGNATURE,
            f"frame {counter} failed authentication (tampered, replayed or reordered)",
        )

    # ---- large frames -----------------------------------------------------------------------

    def _take_buffer(self, n: int) -> bytearray:
        for i, candidate in enumerate(self._pool):
            # At most twice the need, so one odd large frame cannot pin memory for small ones.
            if n <= len(candidate) <= 2 * n:
                self._pooled -= len(candidate)
                return self._pool.pop(i)
        return bytearray(n)

    def recycle(self, frame: SealedFrame) -> None:
        """Return a consumed frame's buffer for reuse (optional; unreturned ones are freed)."""
        if self._pooled + len(frame.buffer) <= self.pool_limit:
            self._pool.append(frame.buffer)
            self._pooled += len(frame.buffer)

    def release_pool(self) -> None:
        """Free the pooled buffers (the channel is ending: nothing large will arrive that a
        consumer waits for). Later frames still get buffers, fresh ones."""
        self._pool.clear()
        self._pooled = 0
        self.pool_limit = 0

    def open(self, frame: SealedFrame) -> bytes:
        """Authenticate and decrypt ``frame`` into new bytes.

        Each frame carries its own counter, so frames handed out before a later one failed
        still open.

        Raises:
            ProtocolViolation: authentication failed (the opener is then failed).
        """
        with memoryview(frame.buffer) as view, view[: frame.length] as body:
            try:
                return self._aead.decrypt(_nonce(self._label, frame.counter), body, frame.header)
            except InvalidTag:
                self._failed = self._auth_failure(frame.counter)
                raise self._failed from None

    def open_into(self, frame: SealedFrame, out: bytearray | memoryview) -> int:
        """Authenticate and decrypt ``frame`` into the start of ``out``; returns its size.

        On failure ``out`` may hold garbage. Raises ``ValueError`` if ``out`` is too small and
        ``ProtocolViolation`` if authentication fails (the opener is then failed).
        """
        n = frame.size
        if len(out) < n:
            raise ValueError(f"buffer of {len(out)} bytes cannot hold a frame of {n}")
        nonce = _nonce(self._label, frame.counter)
        with (
            memoryview(frame.buffer) as view,
            view[: frame.length] as body,
            memoryview(out) as target,
            target[:n] as dest,
        ):
            try:
                if _HAS_DECRYPT_INTO:
                    self._aead.decrypt_into(nonce, body, frame.header, dest)
                else:
                    dest[:] = self._aead.decrypt(nonce, body, frame.header)
            except InvalidTag:
                self._failed = self._auth_failure(frame.counter)
                raise self._failed from None
        return n

    def end_of_stream(self) -> None:
        """The transport ended; raise ``PeerUnavailable`` if it ended inside a frame."""
        if self.buffered:
            raise PeerUnavailable(
                f"stream ended inside a frame ({self.buffered} bytes of it received)"
            )
