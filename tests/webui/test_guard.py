"""Who may talk to the web UI, decided from headers alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dandelion_p2p.webui.guard import (
    COOKIE_NAME,
    check_request,
    host_allowed,
    origin_allowed,
    split_host,
)

TOKEN = "t" * 43
HOST = "127.0.0.1:4080"
SESSION = "s" * 43
OURS = f"{COOKIE_NAME}_4080"


def decide(method: str = "GET", *, query: str | None = None, websocket: bool = False,
           bind_host: str = "127.0.0.1", **headers: str) -> tuple[int, str]:
    verdict = check_request(
        method=method,
        headers={"host": HOST, **{k.replace("_", "-"): v for k, v in headers.items()}},
        query_token=query,
        token=TOKEN,
        bind_host=bind_host,
        session=SESSION,
        websocket=websocket,
    )
    return verdict.status, verdict.via


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:4080", True),
        ("localhost:4080", True),
        ("[::1]:4080", True),
        ("10.1.2.3", True),
        ("attacker.example:4080", False),
        ("127.0.0.1.nip.io:4080", False),
        ("", False),
        ("user@127.0.0.1", False),
        ("127.0.0.1/path", False),
        ("[::1", False),
    ],
)
def test_host_header(host: str, allowed: bool) -> None:
    assert host_allowed(host, "127.0.0.1") is allowed


def test_configured_host_name_is_served() -> None:
    assert host_allowed("trainer.lan:4080", "trainer.lan")
    assert not host_allowed("trainer.lan:4080", "0.0.0.0")


def test_origin_must_be_our_own() -> None:
    assert origin_allowed("http://127.0.0.1:4080", HOST)
    assert not origin_allowed("http://127.0.0.1:4081", HOST)
    assert not origin_allowed("http://evil.example", HOST)
    assert not origin_allowed("null", HOST)
    assert not origin_allowed("file://", HOST)


def test_token_sources() -> None:
    assert decide(authorization=f"Bearer {TOKEN}") == (0, "header")
    assert decide(cookie=f"{OURS}={SESSION}") == (0, "cookie")
    # The cookie holds the session secret, never the token; and it is this port's cookie.
    assert decide(cookie=f"{OURS}={TOKEN}")[0] == 401
    assert decide(cookie=f"{COOKIE_NAME}_4081={SESSION}")[0] == 401
    # Other local apps' odd cookies do not hide ours.
    assert decide(cookie=f'x={{"a":1}}; y=a b; z=\u00e9; {OURS}={SESSION}') == (0, "cookie")
    assert decide(query=TOKEN) == (0, "query")
    assert decide()[0] == 401
    assert decide(authorization=f"Basic {TOKEN}")[0] == 401
    assert decide(authorization="Bearer " + "t" * 42)[0] == 401
    assert decide(cookie="other=1; " + f"{OURS}=wrong")[0] == 401
    assert decide(cookie='bad"cookie')[0] == 401
    # A token in the URL logs in page loads only, never changes state.
    assert decide("POST", query=TOKEN)[0] == 401
    assert decide(query=TOKEN, websocket=True)[0] == 401


def test_state_changes_need_our_origin() -> None:
    bearer = f"Bearer {TOKEN}"
    cookie = f"{OURS}={SESSION}"
    assert decide("POST", authorization=bearer)[0] == 0  # scripts and curl send no Origin
    assert decide("POST", authorization=bearer, origin="http://evil.example")[0] == 403
    assert decide("POST", cookie=cookie)[0] == 403
    assert decide("POST", cookie=cookie, origin="http://evil.example")[0] == 403
    assert decide("POST", cookie=cookie, origin=f"http://{HOST}")[0] == 0
    assert decide(cookie=cookie, websocket=True, origin="http://evil.example")[0] == 403
    assert decide(cookie=cookie, websocket=True, origin=f"http://{HOST}")[0] == 0


def test_foreign_host_refused_before_the_token_is_looked_at() -> None:
    verdict = check_request(method="GET", headers={"host": "evil.example"}, query_token=None,
                            token=TOKEN, bind_host="127.0.0.1")
    assert verdict.status == 421


@given(st.text(max_size=300))
def test_any_host_header_is_decided_without_error(text: str) -> None:
    split_host(text)
    host_allowed(text, "127.0.0.1")
    origin_allowed(text, HOST)
