"""Dial-back over libp2p: the helper's stream handler with its TCP probes, and the requester's
call. The decisions are ``protocol``'s; this module only moves bytes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import DandelionError, PeerUnavailable
from dandelion_p2p.net.dialback.protocol import (
    DIALBACK,
    MAX_FRAME,
    PROBE_TIMEOUT,
    PROTOCOL_ID,
    DialBackRequest,
    DialBackResult,
    ListenerProbe,
    ProbeTarget,
    as_request,
    dial_back_result,
    observed_ip,
    probe_targets,
    read_result,
)
from dandelion_p2p.net.streams import ViolationSink, request, serve_requests
from dandelion_p2p.wire import Message

log = logging.getLogger(__name__)


async def probe_libp2p_listener(ip: str, port: int, timeout: float) -> bool:
    """Whether a fresh TCP connection to ip:port reaches a multistream-select speaker."""
    probe = ListenerProbe()
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        async with stream:
            await stream.send_all(ListenerProbe.GREETING)
            while (verdict := probe.receive(await stream.receive_some(64))) is None:
                pass
            return verdict
    return False


class DialBackService:
    """The helper side. ``install`` registers the handler on the host; the constructor does
    nothing else."""

    def __init__(
        self,
        host: IHost,
        *,
        probe_timeout: float = PROBE_TIMEOUT,
        on_violation: ViolationSink | None = None,
        is_banned: Callable[[ID], bool] | None = None,
    ) -> None:
        self.host = host
        self.probe_timeout = probe_timeout
        self.on_violation = on_violation
        self.is_banned = is_banned

    def install(self) -> None:
        self.host.set_stream_handler(
            TProtocol(PROTOCOL_ID),
            serve_requests(
                DIALBACK,
                self._answer,
                max_request=MAX_FRAME,
                timeout=self.probe_timeout * 3,
                on_violation=self.on_violation,
                refuse=self.is_banned,
            ),
        )

    def _connections(self, peer_id: ID) -> list[tuple[list[str], str | None]]:
        """Each connection to ``peer_id``: its transport addresses and its remote IP."""
        found: list[tuple[list[str], str | None]] = []
        for conn in self.host.get_network().get_connections(peer_id):
            try:
                transport = [str(a) for a in conn.get_transport_addresses()]
                remote = getattr(conn.muxed_conn, "get_remote_address", lambda: None)()
            except Exception:
                continue
            found.append((transport, str(remote[0]) if remote else None))
        return found

    async def _answer(self, peer_id: ID, msg: Message) -> Message:
        ask = as_request(msg)
        observed = observed_ip(self._connections(peer_id))
        reached: list[str] = []

        async def probe(target: ProbeTarget) -> None:
            if await probe_libp2p_listener(target.ip, target.port, self.probe_timeout):
                reached.append(target.addr)

        # Concurrently, so that the answer comes within one probe timeout however many
        # addresses are unreachable.
        async with trio.open_nursery() as nursery:
            for target in probe_targets(ask, observed):
                nursery.start_soon(probe, target)
        return dial_back_result(ask, observed, reached)


async def ask_dial_back(
    host: IHost, helper: ID, ask: DialBackRequest, timeout: float
) -> DialBackResult:
    """Ask ``helper`` which of the addresses in ``ask`` it can reach with a fresh connection
    (``protocol.dial_back_request`` makes ``ask``).

    Raises:
        PeerUnavailable: the helper could not be asked, did not answer in time, or answered
            with anything but a result.
    """
    try:
        reply = await request(
            host, helper, PROTOCOL_ID, ask, DIALBACK, max_reply=MAX_FRAME, timeout=timeout
        )
    except DandelionError as exc:
        raise PeerUnavailable(f"dial-back via {helper} failed: {exc}") from exc
    return read_result(str(helper), reply)
