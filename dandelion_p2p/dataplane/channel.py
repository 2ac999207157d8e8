"""``Channel``: the async end of a sealed, credit-controlled channel over TCP or a libp2p stream.

Each channel runs two background tasks in the nursery given to ``start``: a reader that always
drains the transport into a bounded queue (bounded by the credit we granted), and a writer of
credit grants. Application tasks call ``send`` and ``receive``. Transport writes are serialised
by one lock and are never interrupted half-way: once a frame starts to go out it is written
whole or the channel breaks, so cancelling ``send`` cannot leave a torn frame on the wire.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol, TypeVar, cast

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID

from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.flow import ChannelCore, Closed, Credit, Data
from dandelion_p2p.dataplane.messages import Mode
from dandelion_p2p.dataplane.sealing import Buffer
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.net.streams import ViolationSink, close_quietly

log = logging.getLogger(__name__)
T = TypeVar("T")

ChannelKind = Literal["direct", "relayed"]

DEFAULT_TIMEOUT = 30.0
# After our CLOSE we keep reading (and discarding) until the peer's end of stream, so closing a
# socket with unread bytes does not turn into a reset that destroys data still in flight to
# the peer. This bounds how long.
DEFAULT_LINGER = 5.0
CONTROL_WRITE_TIMEOUT = 5.0
STREAM_READ_CHUNK = 1024 * 1024


class Transport(Protocol):
    """A byte pipe to the peer. Every method raises ``PeerUnavailable`` when the pipe breaks."""

    kind: ChannelKind

    async def send_all(self, data: Buffer) -> None: ...

    async def receive_into(self, core: ChannelCore) -> int:
        """Move some received bytes into ``core``; 0 at end of stream."""
        ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None:
        """Release the pipe; never raises."""
        ...


class TcpTransport:
    """A plain TCP connection; reads go straight into the frame buffer (``recv_into``)."""

    kind: ChannelKind = "direct"

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send_all(self, data: Buffer) -> None:
        try:
            await self.stream.send_all(memoryview(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"TCP send failed: {exc!r}") from None

    async def receive_into(self, core: ChannelCore) -> int:
        view = core.receive_buffer()
        try:
            n = await self.stream.socket.recv_into(view)
        except (trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"TCP receive failed: {exc!r}") from None
        finally:
            view.release()
        core.commit(n)
        return n

    async def send_eof(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"TCP shutdown failed: {exc!r}") from None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class StreamTransport:
    """A libp2p stream (possibly through a relay): the relayed fallback."""

    kind: ChannelKind = "relayed"

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self._closed = False
        # The read in progress, if any: yamux wakes a reader for the peer's FIN or reset, not
        # for our own close, so ``aclose`` cancels it (as closing a socket wakes its reader).
        self._reading: trio.CancelScope | None = None

    async def send_all(self, data: Buffer) -> None:
        try:
            await self.stream.write(bytes(data))
        except StreamError as exc:
            raise PeerUnavailable(f"stream write failed: {type(exc).__name__}") from None
        except Exception as exc:  # muxer internals raise more than the documented types
            raise PeerUnavailable(f"stream write failed: {exc!r}") from None

    async def receive_into(self, core: ChannelCore) -> int:
        if self._closed:
            raise PeerUnavailable("stream read failed: the transport is closed")
        data = b""
        with trio.CancelScope() as reading:
            self._reading = reading
            try:
                data = await self.stream.read(STREAM_READ_CHUNK)
            except StreamEOF:
                return 0
            except StreamError as exc:
                raise PeerUnavailable(f"stream read failed: {type(exc).__name__}") from None
            except Exception as exc:  # muxer internals raise more than the documented types
                raise PeerUnavailable(f"stream read failed: {exc!r}") from None
            finally:
                self._reading = None
        if reading.cancelled_caught:
            raise PeerUnavailable("stream read failed: the transport was closed")
        core.feed(data)
        return len(data)

    async def send_eof(self) -> None:
        close_write = getattr(self.stream, "close_write", None)
        try:
            if close_write is not None:
                await close_write()
            else:
                await self.stream.close()
        except Exception as exc:
            raise PeerUnavailable(f"stream half-close failed: {exc!r}") from None

    async def aclose(self) -> None:
        self._closed = True
        if self._reading is not None:
            self._reading.cancel()
        await close_quietly(self.stream)


@contextlib.contextmanager
def _deadline(timeout: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError:
        raise PeerUnavailable(f"{what} timed out after {timeout:g} s") from None


class Channel:
    """A sealed channel to one authenticated peer.

    Frames keep their boundaries: each ``send`` arrives as one ``receive``. ``kind`` is
    ``"direct"`` (own TCP connection) or ``"relayed"`` (carried by the libp2p stream, through a
    relay or not); ``mode`` says how the session was set up.
    """

    def __init__(
        self,
        transport: Transport,
        core: ChannelCore,
        *,
        peer_id: ID,
        purpose: str,
        mode: Mode,
        timeout: float = DEFAULT_TIMEOUT,
        linger: float = DEFAULT_LINGER,
        on_violation: ViolationSink | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.created = time.monotonic()
        """When the channel was made (``time.monotonic``): a user that keeps it for reuse
        bounds its age."""
        self.on_violation = on_violation
        self.purpose = purpose
        self.mode = mode
        self.timeout = timeout
        self.linger = linger
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0
        self._transport = transport
        self._core = core
        self._queue: deque[Data] = deque()
        self._frame_arrived = trio.Event()
        self._credit_arrived = trio.Event()
        self._grant_wanted = trio.Event()
        # Serialises data senders (held while waiting for credit)...
        self._sender_lock = trio.Lock()
        # ...and transport writes (held only while bytes go out), so grants never wait for
        # credit: two peers each waiting for the other's grant would deadlock.
        self._write_lock = trio.Lock()
        self._send_buffer = bytearray()
        self._plain_buffer = bytearray()
        self._send_error: PeerUnavailable | ProtocolViolation | None = None
        self._receive_error: PeerUnavailable | ProtocolViolation | None = None
        self._closing = False
        self._reported = False
        self._scope = trio.CancelScope()
        self._started = False
        self.finished = trio.Event()
        """Set when the background tasks have ended and the transport is released."""

    # ---- properties ---------------------------------------------------------------------------

    @property
    def kind(self) -> ChannelKind:
        return self._transport.kind

    @property
    def max_frame(self) -> int:
        """The largest frame the peer accepts from us."""
        return self._core.send_max_frame

    @property
    def receive_max_frame(self) -> int:
        """The largest frame we accept from the peer (what ``receive_into`` may need)."""
        return self._core.opener.max_frame

    @property
    def is_open(self) -> bool:
        return self._send_error is None and not self._closing

    def __repr__(self) -> str:
        return (
            f"<Channel {self.purpose!r} to {self.peer_id} {self.kind}/{self.mode} "
            f"sent={self.bytes_sent} received={self.bytes_received}>"
        )

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Start the background tasks; the channel lives at most as long as ``nursery``."""
        if self._started:
            raise RuntimeError("channel already started")
        self._started = True
        self._grant_wanted.set()  # the initial window
        nursery.start_soon(self._run)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Send CLOSE and end the channel; frames already sent are still delivered.

        Returns promptly: the transport is released in the background once the peer's end of
        stream arrives or ``linger`` seconds pass. Idempotent; never raises.
        """
        if self._closing:
            return
        self._closing = True
        closed = ChannelClosed("the channel was closed locally")
        if self._send_error is None and self._started:
            with trio.CancelScope(shield=True), trio.move_on_after(CONTROL_WRITE_TIMEOUT):
                try:
                    async with self._write_lock:
                        await self._transport.send_all(self._core.seal_close())
                        await self._transport.send_eof()
                except PeerUnavailable as exc:
                    log.debug("CLOSE to %s not delivered: %s", self.peer_id, exc)
        self._set_send_error(closed)
        if self._receive_error is None:
            self._receive_error = closed
        self._queue.clear()
        self.release_buffers()
        self._wake_receivers()
        self._grant_wanted.set()
        if self._started:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + self.linger)
        else:
            await self._transport.aclose()
            self.finished.set()

    def release_buffers(self) -> None:
        """Give back the MiBs this channel holds for frames: once it is closed (its transport
        may linger a few seconds), or while it idles between uses. Later frames get fresh
        buffers, not pooled ones."""
        self._send_buffer = bytearray()
        self._plain_buffer = bytearray()
        self._core.opener.release_pool()

    def abort(self) -> None:
        """End the channel now, without CLOSE; the peer sees a cut-off stream."""
        self._fail(ChannelClosed("the channel was aborted locally"))

    # ---- sending ------------------------------------------------------------------------------

    async def send(
        self, frame: Buffer | Sequence[Buffer], *, timeout: float | None = None
    ) -> None:
        """Send one frame (1 byte to ``max_frame`` bytes), given whole or as parts to be
        joined (a header and a view of a tensor, say: joined once, into a reused buffer).

        Waits for credit from the peer, then writes the frame. ``timeout`` (default: the
        channel's) bounds the wait for credit; the write itself, once started, is bounded by
        the channel's timeout and is not interrupted by cancellation.

        Raises:
            ValueError: the frame is empty or larger than ``max_frame``.
            ChannelClosed: the channel was closed (by either side).
            PeerUnavailable: no credit in time, or the transport broke (the channel is then
                broken for good).
            ProtocolViolation: the peer broke the protocol earlier (the channel is broken).

        Cancellation while waiting leaves the channel intact and the frame unsent.
        """
        parts: list[memoryview] | None = None
        if isinstance(frame, list | tuple):
            parts = [memoryview(p).cast("B") for p in frame]
            n = sum(p.nbytes for p in parts)
            payload: Buffer = b""
        else:
            payload = cast(Buffer, frame)
            n = memoryview(payload).nbytes
        if not 0 < n <= self._core.send_max_frame:
            raise ValueError(f"frame of {n} bytes outside 1..{self._core.send_max_frame}")
        if not self._started:
            raise RuntimeError("channel not started")
        wait = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + wait
        # The deadline bounds only the waits: a frame being written is never abandoned.
        with trio.move_on_at(deadline) as waiting:
            await self._sender_lock.acquire()
        if waiting.cancelled_caught:
            raise PeerUnavailable(f"no turn to send to {self.peer_id} within {wait:g} s")
        try:
            with trio.move_on_at(deadline) as waiting:
                while True:
                    self._check_send()
                    if self._core.can_send(n):
                        break
                    event = self._credit_arrived
                    await event.wait()
                await self._write_lock.acquire()
            if waiting.cancelled_caught:
                raise PeerUnavailable(f"no credit from {self.peer_id} within {wait:g} s")
            try:
                self._check_send()
                size = self._core.frame_size(n)
                if len(self._send_buffer) < size:
                    self._send_buffer = bytearray(size)
                if parts is not None:
                    payload = self._gather(parts, n)
                with memoryview(self._send_buffer) as view:
                    self._seal(self._core.seal_data_into, view, payload)
                    await self._write_whole(view[:size])
            finally:
                self._write_lock.release()
        finally:
            self._sender_lock.release()
        self.bytes_sent += n
        self.frames_sent += 1

    def _gather(self, parts: list[memoryview], n: int) -> memoryview:
        if len(self._plain_buffer) < n:
            self._plain_buffer = bytearray(n)
        view = memoryview(self._plain_buffer)
        at = 0
        for part in parts:
            view[at : at + part.nbytes] = part
            at += part.nbytes
        return view[:n]

    async def _write_whole(self, data: memoryview) -> None:
        """Write a sealed frame completely or break the channel; shielded from cancellation."""
        with trio.CancelScope(shield=True):
            try:
                with _deadline(self.timeout, f"writing to {self.peer_id}"):
                    await self._transport.send_all(data)
            except PeerUnavailable as exc:
                self._fail(exc)
                raise
            finally:
                data.release()

    def _seal(self, seal: Callable[..., T], *args: object) -> T:
        try:
            return seal(*args)
        except ChannelClosed as exc:  # the nonce counter ran out: this channel is done
            self._fail(exc)
            raise

    def _check_send(self) -> None:
        if self._send_error is not None:
            raise self._send_error
        self._core.check_can_send()

    # ---- receiving ----------------------------------------------------------------------------

    async def receive(self, *, timeout: float | None = None) -> bytes:
        """The next frame, in order, as new bytes.

        Frames that arrived before the channel ended are delivered first. For frames of
        MiBs, ``receive_into`` spares an allocation (and its page faults) per frame.

        Raises:
            ChannelClosed: the peer (or we) closed the channel and every frame was delivered.
            PeerUnavailable: nothing arrived within ``timeout`` (default: the channel's; the
                channel stays usable), or the stream was cut off, possibly mid-frame.
            ProtocolViolation: a frame was tampered with, replayed, reordered, or broke the
                credit rules; the channel is broken.

        Cancellation leaves the channel intact; no frame is lost.
        """
        data = await self._next(timeout)
        self._queue.popleft()
        return self._consume(data, self._core.open, data.payload)

    async def receive_into(
        self, out: bytearray | memoryview, *, timeout: float | None = None
    ) -> int:
        """Write the next frame into the start of ``out`` (e.g. a tensor's buffer); returns its
        size. Large frames are decrypted straight into ``out``, with no copy in between.

        Raises what ``receive`` raises, and ``ValueError`` if ``out`` is smaller than the frame
        (which then stays queued). On ``ProtocolViolation`` ``out`` may hold garbage.
        """
        data = await self._next(timeout)
        if len(out) < data.size:
            raise ValueError(f"buffer of {len(out)} bytes cannot hold a frame of {data.size}")
        self._queue.popleft()
        return self._consume(data, self._core.open_into, data.payload, out)

    async def _next(self, timeout: float | None) -> Data:
        wait = self.timeout if timeout is None else timeout
        with _deadline(wait, f"waiting for a frame from {self.peer_id}"):
            while not self._queue:
                if self._receive_error is not None:
                    raise self._receive_error
                if not self._started:
                    raise RuntimeError("channel not started")
                event = self._frame_arrived
                await event.wait()
        return self._queue[0]

    def _consume(self, data: Data, open_: Callable[..., T], *args: object) -> T:
        try:
            result = open_(*args)
        except ProtocolViolation as exc:
            log.info("channel %r to %s failed: %s", self.purpose, self.peer_id, exc)
            # Frames queued behind a forged one must not be delivered across the gap, nor may a
            # CLOSE that came after it pass for an orderly end.
            self._queue.clear()
            self._receive_error = exc
            self._fail(exc)
            raise
        if self._send_error is None and self._core.consumed(data.size):
            self._grant_wanted.set()
        return result

    # ---- background ---------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_grants)
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        finally:
            if self._receive_error is None:
                self._receive_error = PeerUnavailable("the channel's reader stopped")
            self._set_send_error(PeerUnavailable("the channel's reader stopped"))
            self._wake_receivers()
            with trio.CancelScope(shield=True):
                await self._transport.aclose()
            self.finished.set()

    async def _read_loop(self) -> None:
        core = self._core
        try:
            while True:
                # Events first: the handshake may have left frames buffered in the core.
                while (event := core.next_event()) is not None:
                    if isinstance(event, Data):
                        if self._closing:
                            continue  # closed locally: nobody will read it
                        self._queue.append(event)
                        self.bytes_received += event.size
                        self.frames_received += 1
                        self._wake_receivers()
                    elif isinstance(event, Credit):
                        self._wake_senders()
                    elif isinstance(event, Closed):
                        closed = ChannelClosed("the peer closed the channel")
                        if self._receive_error is None:
                            self._receive_error = closed
                        self._set_send_error(closed)
                        self._wake_receivers()
                n = await self._transport.receive_into(core)
                if n == 0:
                    core.end_of_stream()
                    return
        except (PeerUnavailable, ProtocolViolation) as exc:
            if not self._closing:
                log.info("channel %r to %s failed: %s", self.purpose, self.peer_id, exc)
            self._fail(exc)

    async def _write_grants(self) -> None:
        while True:
            event = self._grant_wanted
            await event.wait()
            if event is self._grant_wanted:
                self._grant_wanted = trio.Event()
            if self._closing or self._send_error is not None:
                return
            async with self._write_lock:
                try:
                    grant = self._seal(self._core.take_grant)
                except ChannelClosed:
                    return
                if grant is None:
                    continue
                with trio.CancelScope(shield=True):
                    try:
                        with _deadline(self.timeout, f"granting credit to {self.peer_id}"):
                            await self._transport.send_all(grant)
                    except PeerUnavailable as exc:
                        self._fail(exc)
                        return

    # ---- state --------------------------------------------------------------------------------

    def _fail(self, exc: PeerUnavailable | ProtocolViolation) -> None:
        """Break the channel: both directions end with ``exc`` and the transport is dropped."""
        if isinstance(exc, ProtocolViolation) and not self._reported and self.on_violation:
            self._reported = True  # one violation breaks the channel; count it once
            self.on_violation(self.peer_id, exc.code)
        if self._receive_error is None:
            self._receive_error = exc
        self._set_send_error(exc)
        self._wake_receivers()
        self._scope.cancel()
        if not self._started:
            self.finished.set()

    def _set_send_error(self, exc: PeerUnavailable | ProtocolViolation) -> None:
        if self._send_error is None:
            self._send_error = exc
        self._wake_senders()

    def _wake_receivers(self) -> None:
        self._frame_arrived.set()
        self._frame_arrived = trio.Event()

    def _wake_senders(self) -> None:
        self._credit_arrived.set()
        self._credit_arrived = trio.Event()

