"""Session setup: agree on keys and a transport over an authenticated libp2p stream.

The libp2p stream is encrypted and authenticated by Noise, so the acceptor can hand the opener
a fresh secret on it. Then:

* ``dial-acceptor``: the acceptor has a reachable TCP endpoint. It registers the ticket before
  answering; the opener connects there and sends the 16-byte ticket first.
* ``dial-opener``: only the opener is reachable. The opener registers the ticket on receiving
  the answer and says ``OpenReady``; the acceptor then connects to the opener's endpoint and
  sends the ticket first.
* ``stream``: neither; the libp2p stream itself carries the sealed frames.

If the dialing side cannot connect, present the ticket and get back a first frame that
authenticates, it says ``DialFailed`` on the stream and both sides fall back to ``stream``
mode, so a wrong reachability claim costs one timeout, not the channel. A TCP connection
proves nothing by itself, either way: its first 16 bytes must be a ticket the listener is
waiting for, and the frames after it must open under keys only the two peers hold.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from dandelion_p2p.dataplane.channel import StreamTransport, TcpTransport, Transport
from dandelion_p2p.dataplane.flow import ChannelCore, Role
from dandelion_p2p.dataplane.messages import (
    DATAPLANE,
    MAX_DETAIL,
    MAX_HANDSHAKE_FRAME,
    DialFailed,
    Mode,
    OpenAccept,
    OpenReady,
    OpenRequest,
    parse_endpoint,
)
from dandelion_p2p.dataplane.sealing import SECRET_SIZE, TICKET_SIZE, derive_keys
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RemoteRejected
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.streams import close_quietly, read_message, write_message
from dandelion_p2p.wire import Message, Reject, RejectCode

log = logging.getLogger(__name__)

# Socket buffers for data connections. Explicit sizes switch off Linux's buffer auto-tuning,
# which on loopback and LAN already grows to several MiB; None keeps the kernel's choice.
SOCKET_BUFFER: int | None = None
# trio sets TCP_NOTSENT_LOWAT to 16 KiB, which suits interactive streams but makes every large
# write a string of 16 KiB wake-ups; bulk frames want the kernel to queue freely.
NOTSENT_LOWAT = 4 * 1024 * 1024
# Read size while waiting for the first frame: the peer's opening CREDIT is 33 bytes.
CONFIRM_READ = 64 * 1024


def tune_socket(stream: trio.SocketStream) -> None:
    sock = stream.socket
    for level, option, value in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", None), NOTSENT_LOWAT),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER),
    ):
        if option is not None and value is not None:
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:  # not every platform has every option
                log.debug("setsockopt(%s, %s) failed: %s", level, option, exc)


# ---- tickets ----------------------------------------------------------------------------------


class TicketSlot:
    """One expected TCP connection: filled by the listener when the ticket arrives."""

    def __init__(self, ticket: bytes, peer_id: ID, expires_at: float) -> None:
        self.ticket = ticket
        self.peer_id = peer_id
        self.expires_at = expires_at
        self.stream: trio.SocketStream | None = None
        self._arrived = trio.Event()

    def deliver(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._arrived.set()

    async def wait(self) -> trio.SocketStream:
        await self._arrived.wait()
        assert self.stream is not None
        return self.stream


class TicketBook:
    """Tickets we wait for. A ticket is single-use and expires with its slot's deadline."""

    def __init__(self) -> None:
        self._slots: dict[bytes, TicketSlot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def expect(self, ticket: bytes, peer_id: ID, expires_at: float) -> TicketSlot:
        if len(ticket) != TICKET_SIZE:
            raise ValueError("ticket must be 16 bytes")
        if ticket in self._slots:
            # Two random 16-byte tickets colliding means a broken random source, or a peer
            # replaying a ticket it was given.
            raise ProtocolViolation(RejectCode.UNEXPECTED, "ticket already expected")
        slot = TicketSlot(ticket, peer_id, expires_at)
        self._slots[ticket] = slot
        return slot

    def claim(self, ticket: bytes, now: float) -> TicketSlot | None:
        """The slot waiting for ``ticket``, removed from the book; None if unknown or expired."""
        slot = self._slots.pop(ticket, None)
        if slot is None or slot.expires_at < now or slot.stream is not None:
            return None
        return slot

    def discard(self, slot: TicketSlot) -> None:
        if self._slots.get(slot.ticket) is slot:
            del self._slots[slot.ticket]


async def read_ticket(stream: trio.SocketStream, timeout: float) -> bytes | None:
    """The first 16 bytes of a fresh connection, or None if they do not come in time."""
    ticket = bytearray()
    with trio.move_on_after(timeout):
        try:
            while len(ticket) < TICKET_SIZE:
                chunk = await stream.receive_some(TICKET_SIZE - len(ticket))
                if not chunk:
                    return None
                ticket += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        return bytes(ticket)
    return None


async def connect_and_present(
    endpoint: str, ticket: bytes, timeout: float, core: ChannelCore
) -> trio.SocketStream:
    """Connect to ``endpoint``, send ``ticket`` first, and wait for the peer's first sealed
    frame, which ``core`` opens (it stays buffered there for the channel).

    A connection is not proof of reaching the peer: a stale port mapping, a NAT hairpin or a
    wrong advertised address can reach someone else, who would refuse the ticket in silence.
    Only a frame that authenticates shows the peer took it.

    Raises:
        PeerUnavailable: no connection, the ticket could not be sent, or no authentic frame
            came back within ``timeout``.
    """
    try:
        ip, port = parse_endpoint(endpoint)
    except ValueError as exc:
        raise PeerUnavailable(f"bad endpoint {endpoint!r}: {exc}") from None
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(ip, port)
            tune_socket(stream)
            await stream.send_all(ticket)
            while not core.peek_event():
                data = await stream.receive_some(CONFIRM_READ)
                if not data:
                    raise PeerUnavailable(f"{endpoint} closed the connection on our ticket")
                core.feed(data)
    except (
        OSError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        PeerUnavailable,
        ProtocolViolation,
    ) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise PeerUnavailable(f"cannot reach data endpoint {endpoint}: {exc!r}") from None
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    return stream


# ---- addresses --------------------------------------------------------------------------------


def connection_is_relayed(stream: INetStream) -> bool:
    try:
        addrs = [str(a) for a in stream.muxed_conn.get_transport_addresses()]
    except Exception:
        return False
    return any(maddrs.is_relayed(a) for a in addrs)


def remote_ip(stream: INetStream) -> str | None:
    try:
        address = stream.get_remote_address()
    except Exception:
        return None
    if not address:
        return None
    try:
        return str(ipaddress.ip_address(address[0]))
    except ValueError:
        return None


def route_source_ip(destination: str) -> str | None:
    """The local address the OS would use to reach ``destination``; sends no packet."""
    try:
        version = ipaddress.ip_address(destination).version
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((destination, 9))
            return str(probe.getsockname()[0])
    except (OSError, ValueError):
        return None


def endpoint_plausible(endpoint: str, stream: INetStream) -> bool:
    """Whether dialing the opener's ``endpoint`` is safe: on a direct connection its IP must be
    the one the connection comes from, so a peer cannot point our dialer at third parties.
    Through a relay the opener's address is unknown and its claim is taken as it is."""
    if connection_is_relayed(stream):
        return True
    try:
        ip, _ = parse_endpoint(endpoint)
    except ValueError:
        return False
    return ip == remote_ip(stream)


def choose_mode(
    *, direct_allowed: bool, acceptor_endpoint: str | None, opener_endpoint: str | None
) -> Mode:
    """Who dials whom: the acceptor if it is reachable, else the opener, else nobody."""
    if not direct_allowed:
        return "stream"
    if acceptor_endpoint is not None:
        return "dial-acceptor"
    if opener_endpoint is not None:
        return "dial-opener"
    return "stream"


# ---- handshake --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionSettings:
    max_frame: int
    window_bytes: int | None
    connect_timeout: float
    """Bound on one TCP connect + ticket, before falling back to stream mode."""


@dataclass
class Established:
    transport: Transport
    core: ChannelCore
    mode: Mode
    purpose: str


def _slot_expiry(settings: SessionSettings) -> float:
    # The dialer may use all of its connect timeout; a little slack covers the message that
    # told it to dial.
    return trio.current_time() + settings.connect_timeout + 2.0


def _core(
    role: Role,
    secret: bytes,
    ticket: bytes,
    opener: ID,
    acceptor: ID,
    settings: SessionSettings,
    peer_max_frame: int,
) -> ChannelCore:
    keys = derive_keys(secret, ticket, opener.to_bytes(), acceptor.to_bytes())
    return ChannelCore.for_session(
        keys,
        role,
        receive_max_frame=settings.max_frame,
        send_max_frame=peer_max_frame,
        window_bytes=settings.window_bytes,
    )


async def _read(stream: INetStream) -> Message:
    return await read_message(stream, DATAPLANE, MAX_HANDSHAKE_FRAME)


async def _socket_or_fallback(slot: TicketSlot, stream: INetStream) -> trio.SocketStream | None:
    """Wait for the dialer's TCP connection, or for its ``DialFailed`` (then None).

    The dialer closes the libp2p stream once its ticket is sent, so an end of stream here means
    "keep waiting for the socket"; the caller's deadline bounds the wait.
    """
    result: list[trio.SocketStream | None] = []

    async def watch_socket(cancel: trio.CancelScope) -> None:
        result.append(await slot.wait())
        cancel.cancel()

    async def watch_stream(cancel: trio.CancelScope) -> None:
        try:
            msg = await _read(stream)
        except PeerUnavailable:
            await trio.sleep_forever()
        if not isinstance(msg, DialFailed):
            raise ProtocolViolation(RejectCode.UNEXPECTED, f"expected DialFailed, got {msg!r}")
        log.info("peer could not dial the data endpoint (%s); using the stream", msg.detail)
        result.append(None)
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_socket, nursery.cancel_scope)
        nursery.start_soon(watch_stream, nursery.cancel_scope)
    return result[0]


async def _dial_or_fallback(
    stream: INetStream, endpoint: str, ticket: bytes, settings: SessionSettings, core: ChannelCore
) -> trio.SocketStream | None:
    try:
        return await connect_and_present(endpoint, ticket, settings.connect_timeout, core)
    except PeerUnavailable as exc:
        log.info("%s; falling back to the libp2p stream", exc)
        await write_message(stream, DialFailed(detail=str(exc)[:MAX_DETAIL]))
        return None


async def open_session(
    stream: INetStream,
    *,
    local: ID,
    remote: ID,
    purpose: str,
    opener_endpoint: str | None,
    direct: bool,
    tickets: TicketBook,
    settings: SessionSettings,
) -> Established:
    """The opener's side of the handshake on a fresh stream to ``remote``.

    On success the stream is owned by the returned transport (stream mode) or closed. On
    failure the caller closes the stream.

    Raises:
        PeerUnavailable: the stream broke or a step timed out (the caller's deadline).
        RemoteRejected: the acceptor refused (e.g. ``NOT_FOUND``: no handler for ``purpose``).
        ProtocolViolation: the acceptor's answer broke the protocol.
    """
    request = OpenRequest(
        purpose=purpose,
        max_frame=settings.max_frame,
        opener_endpoint=opener_endpoint if direct else None,
        direct=direct,
    )
    await write_message(stream, request)
    reply = await _read(stream)
    if isinstance(reply, Reject):
        raise RemoteRejected(reply.code, reply.detail)
    if not isinstance(reply, OpenAccept):
        raise ProtocolViolation(RejectCode.UNEXPECTED, f"expected OpenAccept, got {reply!r}")
    mode = cast(Mode, reply.mode)  # OpenAccept.check admits only the three modes
    if mode != "stream" and not direct:
        raise ProtocolViolation(RejectCode.UNEXPECTED, f"asked for stream mode, got {mode}")
    if mode == "dial-opener" and request.opener_endpoint is None:
        raise ProtocolViolation(RejectCode.UNEXPECTED, "dial-opener but we offered no endpoint")
    def core() -> ChannelCore:
        return _core("opener", reply.secret, reply.ticket, local, remote, settings, reply.max_frame)

    sock: trio.SocketStream | None = None
    tcp_core = core()
    if mode == "dial-acceptor":
        assert reply.acceptor_endpoint is not None  # OpenAccept.check guarantees it
        sock = await _dial_or_fallback(
            stream, reply.acceptor_endpoint, reply.ticket, settings, tcp_core
        )
    elif mode == "dial-opener":
        slot = tickets.expect(reply.ticket, remote, _slot_expiry(settings))
        try:
            await write_message(stream, OpenReady())
            sock = await _socket_or_fallback(slot, stream)
        finally:
            tickets.discard(slot)
            await _release_unclaimed(slot, sock)
    return await _finish(stream, sock, tcp_core, core, mode, purpose)


async def _finish(
    stream: INetStream,
    sock: trio.SocketStream | None,
    tcp_core: ChannelCore,
    fresh_core: Callable[[], ChannelCore],
    mode: Mode,
    purpose: str,
) -> Established:
    if sock is None:
        # A failed dial may have left part of a frame in the TCP core; the stream starts clean.
        core = tcp_core if mode == "stream" else fresh_core()
        return Established(StreamTransport(stream), core, "stream", purpose)
    await close_quietly(stream)
    return Established(TcpTransport(sock), tcp_core, mode, purpose)


async def _release_unclaimed(slot: TicketSlot, taken: trio.SocketStream | None) -> None:
    """A connection delivered to a slot after we stopped waiting must not leak."""
    if slot.stream is not None and slot.stream is not taken:
        await trio.aclose_forcefully(slot.stream)


async def accept_session(
    stream: INetStream,
    *,
    local: ID,
    remote: ID,
    has_purpose: Callable[[str], bool],
    endpoint_for: Callable[[INetStream], str | None],
    tickets: TicketBook,
    settings: SessionSettings,
) -> Established:
    """The acceptor's side of the handshake on an inbound stream from ``remote``.

    A request that breaks the protocol, or names a purpose nobody serves, is answered with a
    ``Reject`` before the error is raised. Ownership of the stream is as in ``open_session``.

    Raises:
        ProtocolViolation: a bad request (code sent to the peer) or a bad later message.
        PeerUnavailable: the stream broke.
    """
    try:
        request = await _read(stream)
        if not isinstance(request, OpenRequest):
            raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected OpenRequest")
        if not has_purpose(request.purpose):
            raise ProtocolViolation(RejectCode.NOT_FOUND, f"no channel for {request.purpose!r}")
    except ProtocolViolation as exc:
        await write_message(stream, Reject(code=int(exc.code), detail=exc.detail[:512]))
        raise
    own_endpoint = endpoint_for(stream) if request.direct else None
    opener_endpoint = request.opener_endpoint
    if opener_endpoint is not None and not endpoint_plausible(opener_endpoint, stream):
        log.info("ignoring endpoint %s offered by %s: not its address", opener_endpoint, remote)
        opener_endpoint = None
    mode = choose_mode(
        direct_allowed=request.direct,
        acceptor_endpoint=own_endpoint,
        opener_endpoint=opener_endpoint,
    )
    ticket, secret = os.urandom(TICKET_SIZE), os.urandom(SECRET_SIZE)

    def core() -> ChannelCore:
        return _core("acceptor", secret, ticket, remote, local, settings, request.max_frame)

    tcp_core = core()
    accept = OpenAccept(
        ticket=ticket,
        secret=secret,
        mode=mode,
        max_frame=settings.max_frame,
        acceptor_endpoint=own_endpoint if mode == "dial-acceptor" else None,
    )

    sock: trio.SocketStream | None = None
    if mode == "dial-acceptor":
        # Registered before the answer goes out, so the opener's connection cannot outrun it.
        slot = tickets.expect(ticket, remote, _slot_expiry(settings))
        try:
            await write_message(stream, accept)
            sock = await _socket_or_fallback(slot, stream)
        finally:
            tickets.discard(slot)
            await _release_unclaimed(slot, sock)
    elif mode == "dial-opener":
        assert opener_endpoint is not None
        await write_message(stream, accept)
        ready = await _read(stream)
        if not isinstance(ready, OpenReady):
            raise ProtocolViolation(RejectCode.UNEXPECTED, f"expected OpenReady, got {ready!r}")
        sock = await _dial_or_fallback(stream, opener_endpoint, ticket, settings, tcp_core)
    else:
        await write_message(stream, accept)
    return await _finish(stream, sock, tcp_core, core, mode, request.purpose)
