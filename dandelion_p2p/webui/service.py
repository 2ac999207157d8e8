"""The web UI as a daemon service: hypercorn serving the Starlette app on the daemon's own trio
loop. A port already taken, or an unreadable token file, is logged and the daemon runs on
without the UI; nothing here may stop the daemon."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from dandelion_p2p.context import DaemonContext
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.webui.app import build_app
from dandelion_p2p.webui.token import load_or_create_token, token_path

log = logging.getLogger(__name__)

HTTP_LOG = logging.getLogger("dandelion_p2p.webui.http")
# hypercorn announces "Running on ..." at info; we log the URL ourselves.
HTTP_LOG.setLevel(logging.WARNING)

GRACEFUL_TIMEOUT = 1.0
"""Seconds open requests and live log sockets get to finish when the daemon stops."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    if is_loopback(host):
        return None
    return (
        f"web UI listens on {host}, reachable from other machines over plain HTTP: anyone "
        "who learns the token controls this node (prefer 127.0.0.1 and an SSH tunnel)"
    )


def url_host(host: str) -> str:
    """How a browser on this machine names ``host`` in a URL."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); raises ``OSError``."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"{host} has no address")
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class WebUIService:
    name = "web UI"

    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self.url: str | None = None
        self.state = "starting"
        self.detail = ""

    def status_section(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "detail": self.detail}

    def _fail(self, detail: str) -> None:
        self.state = "off"
        self.detail = detail
        log.error("web UI not served: %s; the daemon runs on without it", detail)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED  # type: ignore[name-defined]
    ) -> None:
        config = self.ctx.config
        host, port = config.webui_host, config.webui_port
        try:
            token = load_or_create_token(config.data_dir)
        except ConfigError as exc:
            self._fail(str(exc))
            task_status.started()
            return
        try:
            sock = await bind_listener(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self._fail(
                f"cannot listen on {host}:{port}: {reason} (choose another port with "
                "--webui-port, or 0 for any free port)"
            )
            task_status.started()
            return
        try:
            bound_port = sock.getsockname()[1]
            self.url = f"http://{url_host(host)}:{bound_port}/"
            hyper = HypercornConfig()
            hyper.bind = [f"fd://{os.dup(sock.fileno())}"]
            hyper.accesslog = None
            hyper.errorlog = HTTP_LOG
            hyper.graceful_timeout = GRACEFUL_TIMEOUT
            app = build_app(self.ctx, token)
            async with trio.open_nursery() as nursery:
                await nursery.start(self._serve, app, hyper)
                self.state = "serving"
                warning = exposure_warning(host)
                if warning:
                    log.warning("%s", warning)
                log.info("web UI at %s (token in %s)", self.url, token_path(config.data_dir))
                log.info("web UI: open %s?token=%s", self.url, token)
                task_status.started()
        finally:
            sock.close()

    async def _serve(
        self,
        app: Any,
        hyper: HypercornConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
    ) -> None:
        try:
            await serve(
                app, hyper, shutdown_trigger=self.ctx.shutdown.wait, task_status=task_status
            )
        except Exception as exc:
            self.state = "off"
            self.detail = f"stopped: {exc}"
            log.exception("web UI stopped; the daemon runs on without it")
            with contextlib.suppress(RuntimeError):  # already started: nothing to report
                task_status.started()
        else:
            self.state = "stopped"


def create(ctx: DaemonContext) -> WebUIService | None:
    if not ctx.config.webui:
        return None
    service = WebUIService(ctx)
    ctx.status_sections["webui"] = service.status_section
    return service
