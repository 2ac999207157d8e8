"""The dial-back protocol without I/O: its messages, which addresses a helper may probe, what a
probe must read back, and what the requester makes of the answer (protocol/dialback.md).

AutoNAT v1 in py-libp2p reuses the existing connection and so reports "reachable" wrongly.
Here the helper opens a new TCP connection from its side to each claimed address and checks
that a libp2p listener answers multistream-select there. It only dials the IP address the
request came from, so nobody can use it to probe third parties.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.wire import Message, Registry, RejectCode, invalid

DIALBACK = Registry("dialback")
PROTOCOL_ID = "/dandelion/dialback/1.0.0"
MAX_FRAME = 8 * 1024
MAX_ADDRS = 8
MAX_ADDR_LEN = 300
PROBE_TIMEOUT = 3.0
"""Seconds one probe may take; the helper's whole exchange is bounded by three of them."""
MULTISTREAM = b"/multistream/1.0.0\n"


@DIALBACK.message(1)
class DialBackRequest(Message):
    addrs: tuple[str, ...]

    def check(self) -> None:
        if not 0 < len(self.addrs) <= MAX_ADDRS:
            raise invalid(f"DialBackRequest: 1..{MAX_ADDRS} addresses")
        if any(len(a) > MAX_ADDR_LEN for a in self.addrs):
            raise invalid("DialBackRequest: over-long address")


@DIALBACK.message(2)
class DialBackResult(Message):
    reachable: tuple[str, ...]
    observed_ip: str = ""


# ---- requester -------------------------------------------------------------------------------


def dial_back_request(addrs: Iterable[str]) -> DialBackRequest | None:
    """What to ask a helper about ``addrs``: the first ``MAX_ADDRS`` that are not relayed (a
    circuit address cannot be dialled back); None when none is left to ask about."""
    direct = tuple(a for a in addrs if not maddrs.is_relayed(a))[:MAX_ADDRS]
    return DialBackRequest(addrs=direct) if direct else None


def read_result(helper: str, reply: Message) -> DialBackResult:
    """The helper's answer, trusted as sent (section 4).

    Raises:
        PeerUnavailable: the reply is not a ``DialBackResult``.
    """
    if not isinstance(reply, DialBackResult):
        raise PeerUnavailable(f"dial-back via {helper}: unexpected reply")
    return reply


# ---- helper ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTarget:
    addr: str
    """As the requester wrote it; listed in the result if the probe succeeds."""
    ip: str
    port: int


def tcp_target(addr: str) -> tuple[str, int] | None:
    """The IPv4 address and TCP port of a direct address; None for anything else."""
    ma = maddrs.parse(addr)
    if ma is None or maddrs.is_relayed(addr):
        return None
    try:
        ip = ma.value_for_protocol("ip4")
        port = int(ma.value_for_protocol("tcp"))
    except Exception:
        return None
    return str(ip), port


def observed_ip(connections: Iterable[tuple[Collection[str], str | None]]) -> str:
    """The requester's IP as seen on the first of its connections that is not relayed.

    ``connections``: each connection's transport addresses and its remote IP (None if
    unknown).

    Raises:
        ProtocolViolation: ``UNEXPECTED``, the request came only through relays.
    """
    for transport_addrs, remote_ip in connections:
        if any(maddrs.is_relayed(a) for a in transport_addrs):
            continue
        if remote_ip:
            return remote_ip
    raise ProtocolViolation(RejectCode.UNEXPECTED, "no direct connection to observe")


def as_request(msg: Message) -> DialBackRequest:
    """Raises ``ProtocolViolation`` (``UNKNOWN_TYPE``) for anything but a request."""
    if not isinstance(msg, DialBackRequest):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected a DialBackRequest")
    return msg


def probe_targets(request: DialBackRequest, observed: str) -> list[ProbeTarget]:
    """The requested addresses the helper may dial: direct TCP over IPv4 at ``observed``."""
    targets = []
    for addr in request.addrs:
        target = tcp_target(addr)
        if target is not None and target[0] == observed:
            targets.append(ProbeTarget(addr, *target))
    return targets


def dial_back_result(
    request: DialBackRequest, observed: str, reached: Iterable[str]
) -> DialBackResult:
    """The answer: the addresses whose probe succeeded, in the order they were requested."""
    reachable = tuple(sorted(reached, key=request.addrs.index))
    return DialBackResult(reachable=reachable, observed_ip=observed)


def _varint_prefixed(data: bytes) -> bytes:
    out = bytearray()
    n = len(data)
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + data


class ListenerProbe:
    """One probe's conversation: send ``GREETING`` on a fresh connection, feed what comes back
    to ``receive`` until it gives a verdict.

    A libp2p listener answers multistream-select with the same header; it is looked for in
    the first ``len(MULTISTREAM) + 1`` bytes or more.
    """

    GREETING = _varint_prefixed(MULTISTREAM)

    def __init__(self) -> None:
        self._received = b""

    def receive(self, data: bytes) -> bool | None:
        """True: a listener answered; False: not one (``b""``, the connection closed early);
        None: more bytes are needed."""
        if not data:
            return False
        self._received += data
        if len(self._received) < len(MULTISTREAM) + 1:
            return None
        return MULTISTREAM in self._received
