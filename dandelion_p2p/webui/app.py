"""The ASGI application: the guard in front (token, Host, Origin, security headers, errors
turned into JSON), the JSON API, the live log socket, and the single-page front end."""

from __future__ import annotations

import html
import json
import logging
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dandelion_p2p.context import DaemonContext
from dandelion_p2p.webui.api import WebApi
from dandelion_p2p.webui.guard import check_request, cookie_name, same_origin_location
from dandelion_p2p.webui.http_io import error_body
from dandelion_p2p.webui.scrubbing import SecretScrubber

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
UNAUTHORIZED_PAGE = """<!doctype html><meta charset="utf-8"><title>Dandelion</title>
<body style="font-family:sans-serif;margin:3em"><h1>Dandelion web UI</h1>
<p>{message}.</p><p>The daemon logs a login URL when it starts
(<code>web UI: open http://.../?token=...</code>); the token is also in the file
<code>webui.token</code> in its data directory.</p></body>"""


def _json_error(status: int, message: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps(error_body(message)).encode()
    return (
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *SECURITY_HEADERS,
            ],
        },
        body,
    )


class Guard:
    """Refuses what ``check_request`` refuses, logs in ``?token=`` page loads by cookie, adds
    security headers, and turns an unexpected error into a logged 500 with a message."""

    def __init__(self, app: ASGIApp, *, token: str, bind_host: str) -> None:
        self.app = app
        self.token = token
        self.bind_host = bind_host
        # What the login cookie holds: valid until the daemon stops.
        self.session = secrets.token_urlsafe(32)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        query_token = next((v for k, v in query if k == "token"), None)
        websocket = scope["type"] == "websocket"
        verdict = check_request(
            method=scope.get("method", "GET"),
            headers=headers,
            query_token=query_token,
            token=self.token,
            bind_host=self.bind_host,
            session=self.session,
            websocket=websocket,
        )
        if not verdict.allowed:
            if websocket:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self._refuse(scope, send, verdict.status, verdict.message, headers)
            return
        path: str = scope["path"]
        if verdict.via == "query" and not (path.startswith("/api/") or path == "/metrics"):
            await self._login(scope, send, query, headers)
            return
        await self._serve(scope, receive, send, websocket)

    async def _refuse(
        self, scope: Scope, send: Send, status: int, message: str, headers: dict[str, str]
    ) -> None:
        wants_page = (
            scope["method"] == "GET"
            and not scope["path"].startswith("/api/")
            and "text/html" in headers.get("accept", "")
        )
        if wants_page:
            body = UNAUTHORIZED_PAGE.format(message=html.escape(message)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"text/html; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        *SECURITY_HEADERS,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        start, body = _json_error(status, message)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def _login(
        self, scope: Scope, send: Send, query: list[tuple[str, str]], headers: dict[str, str]
    ) -> None:
        """Set the cookie and reload the page without the token in its URL."""
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        location = same_origin_location(scope["path"]) + (f"?{rest}" if rest else "")
        name = cookie_name(headers.get("host", ""))
        cookie = f"{name}={self.session}; HttpOnly; SameSite=Strict; Path=/"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode()),
                    (b"set-cookie", cookie.encode()),
                    (b"content-length", b"0"),
                    (b"cache-control", b"no-store"),
                    *SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _serve(self, scope: Scope, receive: Receive, send: Send, websocket: bool) -> None:
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            elif message["type"] == "websocket.accept":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log.exception("web UI: %s %s failed", scope.get("method", "WS"), scope["path"])
            if started or websocket:
                return
            start, body = _json_error(500, f"internal error: {type(exc).__name__}: {exc}")
            await send(start)
            await send({"type": "http.response.body", "body": body})


def build_app(ctx: DaemonContext, token: str) -> Starlette:
    scrubber = SecretScrubber(token, ctx.identity)
    api = WebApi(ctx, scrubber)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-store"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return api.out(error_body(str(exc.detail)), exc.status_code)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            *api.routes(),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=[
            Middleware(Guard, token=token, bind_host=ctx.config.webui_host),
        ],
        exception_handlers={HTTPException: http_error},
    )
