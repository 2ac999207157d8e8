"""The data plane's handshake messages (family ``dataplane``) and endpoint strings."""

from __future__ import annotations

import ipaddress
from typing import Literal, get_args

from dandelion_p2p.dataplane.sealing import (
    ABSOLUTE_MAX_FRAME,
    MIN_MAX_FRAME,
    SECRET_SIZE,
    TICKET_SIZE,
)
from dandelion_p2p.wire import Message, Registry, invalid

DATAPLANE = Registry("dataplane")
PROTOCOL_ID = "/dandelion/data/1.0.0"
MAX_HANDSHAKE_FRAME = 1024
MAX_PURPOSE = 64
MAX_ENDPOINT = 64
MAX_DETAIL = 200

Mode = Literal["dial-acceptor", "dial-opener", "stream"]
MODES: tuple[Mode, ...] = get_args(Mode)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"ip:port"`` or ``"[ipv6]:port"`` -> (ip, port).

    Only IP literals: a host name would make the dialer resolve names a remote peer chose.
    Raises ``ValueError``.
    """
    if len(endpoint) > MAX_ENDPOINT:
        raise ValueError("endpoint too long")
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        ip = ipaddress.ip_address(host[1:-1])
        if ip.version != 6:
            raise ValueError(f"endpoint {endpoint!r}: brackets are for IPv6 only")
    else:
        ip = ipaddress.ip_address(host)
        if ip.version != 4:
            raise ValueError(f"endpoint {endpoint!r}: IPv6 must be in brackets")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"endpoint {endpoint!r}: port out of range")
    return str(ip), port


def format_endpoint(ip: str, port: int) -> str:
    parsed = ipaddress.ip_address(ip)
    return f"[{parsed}]:{port}" if parsed.version == 6 else f"{parsed}:{port}"


def _check_endpoint(value: str | None, where: str) -> None:
    if value is None:
        return
    try:
        parse_endpoint(value)
    except ValueError as exc:
        raise invalid(f"{where}: {exc}") from None


def _check_max_frame(value: int, where: str) -> None:
    if not MIN_MAX_FRAME <= value <= ABSOLUTE_MAX_FRAME:
        raise invalid(f"{where}: must be in {MIN_MAX_FRAME}..{ABSOLUTE_MAX_FRAME}")


@DATAPLANE.message(1)
class OpenRequest(Message):
    """Opener -> acceptor: open a channel for ``purpose``."""

    purpose: str
    max_frame: int
    """Largest data frame payload the opener accepts."""
    opener_endpoint: str | None = None
    """Where the opener accepts TCP, if it does."""
    direct: bool = True
    """False asks for stream mode (e.g. after a direct attempt failed before)."""

    def check(self) -> None:
        if not 0 < len(self.purpose) <= MAX_PURPOSE:
            raise invalid(f"OpenRequest.purpose must be 1..{MAX_PURPOSE} characters")
        _check_max_frame(self.max_frame, "OpenRequest.max_frame")
        _check_endpoint(self.opener_endpoint, "OpenRequest.opener_endpoint")


@DATAPLANE.message(2)
class OpenAccept(Message):
    """Acceptor -> opener: the session's ticket, secret and transport."""

    ticket: bytes
    secret: bytes
    mode: str
    max_frame: int
    """Largest data frame payload the acceptor accepts."""
    acceptor_endpoint: str | None = None

    def check(self) -> None:
        if len(self.ticket) != TICKET_SIZE:
            raise invalid(f"OpenAccept.ticket must be {TICKET_SIZE} bytes")
        if len(self.secret) != SECRET_SIZE:
            raise invalid(f"OpenAccept.secret must be {SECRET_SIZE} bytes")
        if self.mode not in MODES:
            raise invalid(f"OpenAccept.mode must be one of {', '.join(MODES)}")
        _check_max_frame(self.max_frame, "OpenAccept.max_frame")
        _check_endpoint(self.acceptor_endpoint, "OpenAccept.acceptor_endpoint")
        if (self.mode == "dial-acceptor") != (self.acceptor_endpoint is not None):
            raise invalid("OpenAccept.acceptor_endpoint is required in, and only in, dial-acceptor")


@DATAPLANE.message(3)
class OpenReady(Message):
    """Opener -> acceptor in dial-opener mode: the ticket is registered; dial now."""


@DATAPLANE.message(4)
class DialFailed(Message):
    """The dialing side could not present the ticket over TCP; both sides use stream mode."""

    detail: str = ""

    def check(self) -> None:
        if len(self.detail) > MAX_DETAIL:
            raise invalid(f"DialFailed.detail longer than {MAX_DETAIL} characters")
