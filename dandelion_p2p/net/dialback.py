"""Reachability by dial-back: a public peer tries to open a fresh connection to our addresses.

AutoNAT v1 in py-libp2p reuses the existing connection and so reports "reachable" wrongly.
Here the helper opens a new TCP connection from its side to each claimed address and checks
that a libp2p listener answers multistream-select there. It only dials the IP address the
request came from, so nobody can use it to probe third parties.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import DandelionError, PeerUnavailable, ProtocolViolation
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.streams import ViolationSink, request, serve_requests
from dandelion_p2p.wire import Message, Registry, RejectCode, invalid

log = logging.getLogger(__name__)

DIALBACK = Registry("dialback")
PROTOCOL_ID = TProtocol("/dandelion/dialback/1.0.0")
MAX_FRAME = 8 * 1024
MAX_ADDRS = 8
MULTISTREAM = b"/multistream/1.0.0\n"


@DIALBACK.message(1)
class DialBackRequest(Message):
    addrs: tuple[str, ...]

    def check(self) -> None:
        if not 0 < len(self.addrs) <= MAX_ADDRS:
            raise invalid(f"DialBackRequest: 1..{MAX_ADDRS} addresses")
        if any(len(a) > 300 for a in self.addrs):
            raise invalid("DialBackRequest: over-long address")


@DIALBACK.message(2)
class DialBackResult(Message):
    reachable: tuple[str, ...]
    observed_ip: str = ""


def _varint_prefixed(data: bytes) -> bytes:
    out = bytearray()
    n = len(data)
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + data


async def probe_libp2p_listener(ip: str, port: int, timeout: float) -> bool:
    """Whether a fresh TCP connection to ip:port reaches a multistream-select speaker."""
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        async with stream:
            await stream.send_all(_varint_prefixed(MULTISTREAM))
            received = b""
            while len(received) < len(MULTISTREAM) + 1:
                chunk = await stream.receive_some(64)
                if not chunk:
                    return False
                received += chunk
            return MULTISTREAM in received
    return False


def _tcp_target(addr: str) -> tuple[str, int] | None:
    ma = maddrs.parse(addr)
    if ma is None or maddrs.is_relayed(addr):
        return None
    try:
        ip = ma.value_for_protocol("ip4")
        port = int(ma.value_for_protocol("tcp"))
    except Exception:
        return None
    return str(ip), port


class DialBackService:
    def __init__(
        self,
        host: IHost,
        *,
        probe_timeout: float = 3.0,
        on_violation: ViolationSink | None = None,
        is_banned: Callable[[ID], bool] | None = None,
    ) -> None:
        self.host = host
        self.probe_timeout = probe_timeout
        self.on_violation = on_violation
        self.is_banned = is_banned

    def install(self) -> None:
        self.host.set_stream_handler(
            PROTOCOL_ID,
            serve_requests(
                DIALBACK,
                self._answer,
                max_request=MAX_FRAME,
                timeout=self.probe_timeout * 3,
                on_violation=self.on_violation,
                refuse=self.is_banned,
            ),
        )

    def _observed_ip(self, peer_id: ID) -> str | None:
        for conn in self.host.get_network().get_connections(peer_id):
            try:
                if any(maddrs.is_relayed(str(a)) for a in conn.get_transport_addresses()):
                    continue
                remote = getattr(conn.muxed_conn, "get_remote_address", lambda: None)()
            except Exception:
                continue
            if remote:
                return str(remote[0])
        return None

    async def _answer(self, peer_id: ID, msg: Message) -> Message:
        if not isinstance(msg, DialBackRequest):
            raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected a DialBackRequest")
        observed = self._observed_ip(peer_id)
        if observed is None:
            raise ProtocolViolation(RejectCode.UNEXPECTED, "no direct connection to observe")
        reachable: list[str] = []

        async def probe(addr: str, ip: str, port: int) -> None:
            if await probe_libp2p_listener(ip, port, self.probe_timeout):
                reachable.append(addr)

        # Concurrently, so that the answer comes within one probe timeout however many
        # addresses are unreachable.
        async with trio.open_nursery() as nursery:
            for addr in msg.addrs:
                target = _tcp_target(addr)
                if target is not None and target[0] == observed:
                    nursery.start_soon(probe, addr, *target)
        reachable.sort(key=msg.addrs.index)
        return DialBackResult(reachable=tuple(reachable), observed_ip=observed)


async def ask_dial_back(
    host: IHost, helper: ID, addrs: list[str], timeout: float
) -> DialBackResult:
    """Ask ``helper`` which of ``addrs`` it can reach with a fresh connection.

    Raises:
        PeerUnavailable: the helper could not be asked or did not answer in time.
    """
    try:
        reply = await request(
            host,
            helper,
            PROTOCOL_ID,
            DialBackRequest(addrs=tuple(addrs[:MAX_ADDRS])),
            DIALBACK,
            max_reply=MAX_FRAME,
            timeout=timeout,
        )
    except DandelionError as exc:
        raise PeerUnavailable(f"dial-back via {helper} failed: {exc}") from exc
    if not isinstance(reply, DialBackResult):
        raise PeerUnavailable(f"dial-back via {helper}: unexpected reply")
    return reply
