"""Who may talk to the web UI, decided from request headers alone (no I/O).

- The access token: ``Authorization: Bearer <token>``, the login cookie, or ``?token=`` on a
  page load (which sets the cookie and redirects to the same URL without it).
- DNS rebinding: a page on an attacker's domain that re-resolves to 127.0.0.1 reaches us with
  that domain in ``Host``. Only IP literals, ``localhost`` and the configured host are served.
- CSRF and cross-site WebSockets: a state-changing request or a WebSocket that carries an
  ``Origin`` must come from our own origin; one authenticated by the cookie must carry it.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

COOKIE_NAME = "dandelion_webui"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Verdict:
    status: int
    """0 when allowed, else the HTTP status to answer with."""
    message: str = ""
    via: str = ""
    """How the token came: header, cookie or query."""

    @property
    def allowed(self) -> bool:
        return self.status == 0


def split_host(host_header: str) -> tuple[str, int | None] | None:
    """``("example", 80)`` from ``example:80``, ``("::1", 80)`` from ``[::1]:80``; None if
    malformed."""
    text = host_header.strip()
    if not text:
        return None
    try:
        parts = urlsplit("//" + text)
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not hostname or parts.path or parts.query or parts.fragment or parts.username:
        return None
    return hostname, port


def host_allowed(host_header: str, bind_host: str) -> bool:
    split = split_host(host_header)
    if split is None:
        return False
    hostname = split[0].lower()
    if hostname in ("localhost", bind_host.lower()):
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def origin_allowed(origin: str, host_header: str) -> bool:
    """True when ``origin`` is ``http(s)://`` + the request's own ``Host``."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
        return False
    return parts.netloc.lower() == host_header.strip().lower()


def cookie_name(host_header: str) -> str:
    """The session cookie's name for the server a request was sent to. Browsers share a
    host's cookies across its ports: a name per port keeps two daemons on one machine from
    overwriting each other's login."""
    _, _, port = host_header.strip().rpartition(":")
    return f"{COOKIE_NAME}_{port}" if port.isdigit() else COOKIE_NAME


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie ``name``. Parsed by hand, leniently: one odd cookie set by some
    other local app (a JSON value, a space) must not hide ours, as it would from
    ``http.cookies``."""
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            return value.strip().strip('"') or None
    return None


def bearer_token(authorization: str) -> str | None:
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def check_request(
    *,
    method: str,
    headers: dict[str, str],
    query_token: str | None,
    token: str,
    bind_host: str,
    session: str | None = None,
    websocket: bool = False,
) -> Verdict:
    """Decide one request. ``headers`` has lower-case names; ``method`` is ``GET`` for a
    WebSocket handshake. ``session`` is the secret the login cookie carries: never the token
    itself, since a browser sends a host's cookies to every port of it."""
    host = headers.get("host", "")
    if not host_allowed(host, bind_host):
        return Verdict(421, f"requests for host {host[:100]!r} are not served here")
    if token_matches(bearer_token(headers.get("authorization", "")), token):
        via = "header"
    elif session is not None and token_matches(
        cookie_value(headers.get("cookie", ""), cookie_name(host)), session
    ):
        via = "cookie"
    elif method in SAFE_METHODS and not websocket and token_matches(query_token, token):
        via = "query"
    else:
        return Verdict(401, "missing or wrong access token: open the login URL the daemon logs")
    changes_state = websocket or method not in SAFE_METHODS
    origin = headers.get("origin")
    if changes_state:
        if origin is not None and not origin_allowed(origin, host):
            return Verdict(403, "cross-origin request refused")
        if origin is None and via == "cookie":
            return Verdict(403, "a request authenticated by cookie must carry its Origin")
    return Verdict(0, via=via)


LOGIN_FALLBACK = "/"
"""Where a login goes when the requested path cannot be echoed back safely."""

PATH_SAFE_CHARACTERS = "/-._~!$&'()*+,;=:@"
"""Characters a same-origin path keeps as they are; every other one is percent-encoded."""


def same_origin_location(path: str) -> str:
    """The ``Location`` that reloads the decoded request ``path`` on our own origin.

    A browser reads ``//host``, ``/\\host`` and such with tabs or newlines inside as
    another site, so leading slashes collapse to one, a path with a backslash or a control
    character goes to ``/``, and the rest is percent-encoded (an encoded ``%2F`` or ``%5C``
    reaches us decoded and is judged as what it decodes to)."""
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return LOGIN_FALLBACK
    location = "/" + quote(path.lstrip("/"), safe=PATH_SAFE_CHARACTERS)
    if location.startswith("//"):
        return LOGIN_FALLBACK
    return location

