"""``DataPlane``: the service that opens and accepts sealed bulk channels between peers.

It owns a TCP listener for direct channels and the libp2p handler of ``/dandelion/data/1.0.0``
on which sessions are agreed. Other services ``register`` a purpose and get each inbound
channel for it; they ``open`` channels to peers they are already connected to.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.dataplane.admission import ChannelLimits, ChannelSlots
from dandelion_p2p.dataplane.channel import DEFAULT_LINGER, DEFAULT_TIMEOUT, Channel
from dandelion_p2p.dataplane.messages import PROTOCOL_ID, format_endpoint, parse_endpoint
from dandelion_p2p.dataplane.sealing import ABSOLUTE_MAX_FRAME, DEFAULT_MAX_FRAME, MIN_MAX_FRAME
from dandelion_p2p.dataplane.session import (
    Established,
    SessionSettings,
    TicketBook,
    accept_session,
    open_session,
    read_ticket,
    remote_ip,
    route_source_ip,
    tune_socket,
)
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.origin import peer_network
from dandelion_p2p.net.streams import NOT_A_FAULT, ViolationSink, close_quietly

log = logging.getLogger(__name__)

ChannelHandler = Callable[[Channel], Awaitable[None]]

# Fresh TCP connections that have not yet shown a ticket. Beyond this many the oldest is
# closed: a flood of idle connections can use neither our file descriptors nor every slot,
# since an honest dialer sends its ticket in the same breath as it connects.
MAX_UNCLAIMED_CONNECTIONS = 64


class DataPlane:
    """Sealed bulk channels to peers, direct over TCP where possible, else over libp2p.

    ``reachable`` says whether peers can connect to ``listen_ip``:``port`` (it may be changed
    while running). ``advertise`` ("ip:port") replaces the bound endpoint in what we tell peers,
    for a port forwarded on a NAT.
    """

    def __init__(
        self,
        host: IHost,
        identity: Identity,
        *,
        listen_ip: str,
        reachable: bool,
        port: int = 0,
        advertise: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        window_bytes: int | None = None,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        ticket_timeout: float = 5.0,
        channel_timeout: float = DEFAULT_TIMEOUT,
        linger: float = DEFAULT_LINGER,
        on_violation: ViolationSink | None = None,
        channel_limits: ChannelLimits | None = None,
    ) -> None:
        if not MIN_MAX_FRAME <= max_frame <= ABSOLUTE_MAX_FRAME:
            raise ValueError(f"max_frame must be in {MIN_MAX_FRAME}..{ABSOLUTE_MAX_FRAME}")
        ipaddress.ip_address(listen_ip)  # ValueError for anything but an IP literal
        if advertise is not None:
            parse_endpoint(advertise)
        self.host = host
        self.identity = identity
        self.peer_id = ID(identity.peer_id_bytes)
        self.listen_ip = listen_ip
        self.reachable = reachable
        self.port = port
        self.advertise = advertise
        self.handshake_timeout = handshake_timeout
        self.ticket_timeout = ticket_timeout
        self.channel_timeout = channel_timeout
        self.linger = linger
        self.on_violation = on_violation
        self.settings = SessionSettings(
            max_frame=max_frame, window_bytes=window_bytes, connect_timeout=connect_timeout
        )
        self.tickets = TicketBook()
        self.bound_port: int | None = None
        self.refused_connections = 0
        self.inbound = ChannelSlots(channel_limits)
        self._handlers: dict[str, ChannelHandler] = {}
        self._nursery: trio.Nursery | None = None
        # Scopes of connections still reading their ticket, oldest first.
        self._unclaimed: dict[int, trio.CancelScope] = {}
        self._accepted = 0

    # ---- configuration --------------------------------------------------------------------

    def register(self, purpose: str, handler: ChannelHandler) -> None:
        """Serve inbound channels for ``purpose``: ``handler(channel)`` runs in the service's
        nursery, and the channel is closed when it returns. Its exceptions are logged."""
        if purpose in self._handlers:
            raise ValueError(f"a handler for {purpose!r} is already registered")
        self._handlers[purpose] = handler

    def unregister(self, purpose: str) -> None:
        self._handlers.pop(purpose, None)

    @property
    def endpoint(self) -> str | None:
        """The bound TCP endpoint as ``ip:port`` (None before ``run`` has bound it)."""
        if self.bound_port is None:
            return None
        return format_endpoint(self.listen_ip, self.bound_port)

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
    ) -> None:
        """Bind the listener, install the libp2p handler, and serve until cancelled.

        Channels opened or accepted by this service end with it.
        """
        listeners = await trio.open_tcp_listeners(self.port, host=self.listen_ip)
        try:
            self.bound_port = int(listeners[0].socket.getsockname()[1])
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self._handle_stream)
                log.info("data plane on %s (reachable: %s)", self.endpoint, self.reachable)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self.host.remove_stream_handler(TProtocol(PROTOCOL_ID))
                    self._nursery = None
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self.bound_port = None

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the data plane is not running")
        return self._nursery

    # ---- opening --------------------------------------------------------------------------

    async def open(
        self, peer_id: ID, purpose: str, *, timeout: float = 10.0, direct: bool = True
    ) -> Channel:
        """Open a channel to ``peer_id`` (already connected over libp2p) for ``purpose``.

        ``direct=False`` asks for stream mode outright. Close the channel with ``aclose``.

        Raises:
            PeerUnavailable: no stream, or the handshake did not finish within ``timeout``.
            RemoteRejected: the peer refused (``NOT_FOUND``: it serves no such purpose).
            ProtocolViolation: the peer broke the handshake (also sent to ``on_violation``).

        Cancellation closes whatever was opened.
        """
        nursery = self._require_nursery()
        stream: INetStream | None = None
        try:
            with trio.fail_after(timeout):
                try:
                    stream = await self.host.new_stream(peer_id, [TProtocol(PROTOCOL_ID)])
                except Exception as exc:
                    raise PeerUnavailable(
                        f"cannot open a data stream to {peer_id}: {exc}"
                    ) from None
                established = await open_session(
                    stream,
                    local=self.peer_id,
                    remote=peer_id,
                    purpose=purpose,
                    opener_endpoint=self._endpoint_for(stream) if direct else None,
                    direct=direct,
                    tickets=self.tickets,
                    settings=self.settings,
                )
        except trio.TooSlowError:
            await self._drop(stream)
            raise PeerUnavailable(f"opening a channel to {peer_id} timed out") from None
        except ProtocolViolation as exc:
            self._report(peer_id, exc)
            await self._drop(stream)
            raise
        except BaseException:
            await self._drop(stream)
            raise
        return self._channel(established, peer_id, nursery)

    def _channel(self, established: Established, peer_id: ID, nursery: trio.Nursery) -> Channel:
        channel = Channel(
            established.transport,
            established.core,
            peer_id=peer_id,
            purpose=established.purpose,
            mode=established.mode,
            timeout=self.channel_timeout,
            linger=self.linger,
            on_violation=self.on_violation,
        )
        channel.start(nursery)
        log.debug("channel %r with %s: %s", established.purpose, peer_id, established.mode)
        return channel

    @staticmethod
    async def _drop(stream: INetStream | None) -> None:
        if stream is not None:
            await close_quietly(stream, reset=True)

    def _endpoint_for(self, stream: INetStream) -> str | None:
        """What we tell the peer on ``stream`` to dial, or None if we are not reachable."""
        if not self.reachable or self.bound_port is None:
            return None
        if self.advertise is not None:
            return self.advertise
        if not ipaddress.ip_address(self.listen_ip).is_unspecified:
            return format_endpoint(self.listen_ip, self.bound_port)
        # Bound to every interface: offer the one that routes towards this peer.
        peer_ip = remote_ip(stream)
        source = route_source_ip(peer_ip) if peer_ip else None
        return format_endpoint(source, self.bound_port) if source else None

    def _report(self, peer_id: ID, exc: ProtocolViolation) -> None:
        log.info("data plane violation by %s: %s", peer_id, exc)
        if self.on_violation is not None and exc.code not in NOT_A_FAULT:
            self.on_violation(peer_id, exc.code)

    # ---- accepting ------------------------------------------------------------------------

    async def _handle_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        nursery = self._nursery
        if nursery is None:
            await close_quietly(stream, reset=True)
            return
        network = peer_network(self.host, peer_id, direct_only=False)
        refusal = self.inbound.take(peer_id.to_bytes(), network)
        if refusal is not None:
            log.info("data channel from %s refused: over the %s bound", peer_id, refusal)
            await close_quietly(stream, reset=True)
            return
        handed_over = False
        try:
            handed_over = await self._accept_channel(stream, peer_id, network, nursery)
        finally:
            if not handed_over:
                self.inbound.give_back(peer_id.to_bytes(), network)

    async def _accept_channel(
        self, stream: INetStream, peer_id: ID, network: str, nursery: trio.Nursery
    ) -> bool:
        """Handshake and start serving; True when the channel runs (its slot is given back
        when it ends)."""
        try:
            with trio.fail_after(self.handshake_timeout):
                established = await accept_session(
                    stream,
                    local=self.peer_id,
                    remote=peer_id,
                    has_purpose=lambda p: p in self._handlers,
                    endpoint_for=self._endpoint_for,
                    tickets=self.tickets,
                    settings=self.settings,
                )
        except ProtocolViolation as exc:
            self._report(peer_id, exc)
            # Closed, not reset: a reset would discard the Reject still on its way.
            await close_quietly(stream)
            return False
        except (PeerUnavailable, RemoteRejected, trio.TooSlowError) as exc:
            log.info("data plane handshake with %s failed: %r", peer_id, exc)
            await self._drop(stream)
            return False
        except Exception:
            log.exception("data plane handshake with %s failed", peer_id)
            await self._drop(stream)
            return False
        handler = self._handlers.get(established.purpose)
        if handler is None or self._nursery is not nursery:
            # Unregistered, or the service stopped, during the handshake.
            with trio.CancelScope(shield=True):
                await established.transport.aclose()
            return False
        channel = self._channel(established, peer_id, nursery)
        nursery.start_soon(self._serve_channel, handler, channel, network)
        return True

    async def _serve_channel(
        self, handler: ChannelHandler, channel: Channel, network: str
    ) -> None:
        try:
            await handler(channel)
        except Exception:
            log.exception("handler for %r channel from %s failed", channel.purpose, channel.peer_id)
        finally:
            try:
                await channel.aclose()
            finally:
                self.inbound.give_back(channel.peer_id.to_bytes(), network)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        nursery = self._require_nursery()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of file descriptors and similar: transient, keep serving.
                log.warning("data listener accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            if len(self._unclaimed) >= MAX_UNCLAIMED_CONNECTIONS:
                self._unclaimed.pop(next(iter(self._unclaimed))).cancel()
            self._accepted += 1
            scope = self._unclaimed[self._accepted] = trio.CancelScope()
            nursery.start_soon(self._take_ticket, stream, self._accepted, scope)

    async def _take_ticket(
        self, stream: trio.SocketStream, key: int, scope: trio.CancelScope
    ) -> None:
        ticket: bytes | None = None
        try:
            with scope:
                ticket = await read_ticket(stream, self.ticket_timeout)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        finally:
            self._unclaimed.pop(key, None)
        slot = self.tickets.claim(ticket, trio.current_time()) if ticket else None
        if slot is None:
            self.refused_connections += 1
            log.debug("closing a data connection without a valid ticket")
            await trio.aclose_forcefully(stream)
            return
        tune_socket(stream)
        slot.deliver(stream)
