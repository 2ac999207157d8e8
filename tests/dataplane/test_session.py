"""Handshake pieces without a network: messages, endpoints, mode choice, tickets."""

from __future__ import annotations

import pytest
from libp2p.peer.id import ID

from dandelion_p2p.dataplane.messages import (
    DATAPLANE,
    DialFailed,
    OpenAccept,
    OpenReady,
    OpenRequest,
    format_endpoint,
    parse_endpoint,
)
from dandelion_p2p.dataplane.session import TicketBook, choose_mode
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.wire import decode, encode


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:65535", ("::1", 65535))],
)
def test_endpoints_parse_and_format(text: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(text) == parsed
    assert format_endpoint(*parsed) == text


@pytest.mark.parametrize(
    "text",
    ["", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "host.example:80", "::1:80", "[1.2.3.4]:80",
     "1.2.3.4:-1", "1.2.3.4:8a", "[::1]:" + "1" * 70],
)
def test_bad_endpoints_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_messages_round_trip() -> None:
    for msg in (
        OpenRequest(purpose="allreduce", max_frame=1 << 24, opener_endpoint="10.0.0.1:4000"),
        OpenRequest(purpose="x", max_frame=4096, direct=False),
        OpenAccept(ticket=bytes(16), secret=bytes(32), mode="stream", max_frame=1 << 20),
        OpenAccept(
            ticket=bytes(16), secret=bytes(32), mode="dial-acceptor", max_frame=1 << 20,
            acceptor_endpoint="[::1]:9",
        ),
        OpenReady(),
        DialFailed(detail="refused"),
    ):
        assert decode(encode(msg), DATAPLANE) == msg


@pytest.mark.parametrize(
    "fields",
    [
        {"ticket": bytes(15)},
        {"secret": bytes(31)},
        {"mode": "carrier-pigeon"},
        {"max_frame": 100},
        {"max_frame": (64 << 20) + 1},
        {"mode": "dial-acceptor"},  # without an endpoint
        {"acceptor_endpoint": "1.2.3.4:5"},  # an endpoint outside dial-acceptor
        {"mode": "dial-acceptor", "acceptor_endpoint": "example.com:80"},
    ],
)
def test_invalid_accepts_are_refused(fields: dict[str, object]) -> None:
    base: dict[str, object] = {
        "ticket": bytes(16), "secret": bytes(32), "mode": "stream", "max_frame": 1 << 20
    }
    with pytest.raises(ProtocolViolation):
        OpenAccept(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields", [{"purpose": ""}, {"purpose": "p" * 65}, {"opener_endpoint": "nowhere"}]
)
def test_invalid_requests_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        OpenRequest(**{"purpose": "p", "max_frame": 1 << 20, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("direct", "acceptor", "opener", "mode"),
    [
        (True, "1.1.1.1:1", "2.2.2.2:2", "dial-acceptor"),
        (True, "1.1.1.1:1", None, "dial-acceptor"),
        (True, None, "2.2.2.2:2", "dial-opener"),
        (True, None, None, "stream"),
        (False, "1.1.1.1:1", "2.2.2.2:2", "stream"),
    ],
)
def test_mode_choice(direct: bool, acceptor: str | None, opener: str | None, mode: str) -> None:
    assert (
        choose_mode(direct_allowed=direct, acceptor_endpoint=acceptor, opener_endpoint=opener)
        == mode
    )


def peer() -> ID:
    return Identity.generate().peer_id


def test_tickets_are_single_use_and_expire() -> None:
    book = TicketBook()
    slot = book.expect(b"t" * 16, peer(), expires_at=10.0)
    assert book.claim(b"u" * 16, now=0.0) is None
    assert book.claim(b"t" * 16, now=0.0) is slot
    assert book.claim(b"t" * 16, now=0.0) is None  # used up
    book.expect(b"e" * 16, peer(), expires_at=10.0)
    assert book.claim(b"e" * 16, now=10.5) is None  # expired
    assert len(book) == 0
    kept = book.expect(b"k" * 16, peer(), expires_at=10.0)
    with pytest.raises(ProtocolViolation):
        book.expect(b"k" * 16, peer(), expires_at=10.0)
    book.discard(kept)
    assert book.claim(b"k" * 16, now=0.0) is None
