"""The JSON API behind the web UI pages (documented in ``docs/webui.md``).

Reads go to the daemon's status and to control methods in ``ctx.handlers``; methods that
belong to subsystems this node does not run answer 501 ``not available on this node`` rather
than anything made up. Every input is checked here and refused with a 4xx and a message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from dandelion_p2p.context import DaemonContext
from dandelion_p2p.errors import (
    ConfigError,
    DandelionError,
    PeerUnavailable,
    ProtocolViolation,
    RemoteRejected,
)
from dandelion_p2p.local_settings import ATTENTIONS, DEVICES, PRECISIONS
from dandelion_p2p.loghub import LogLine
from dandelion_p2p.webui.http_io import (
    ApiError,
    JSONOut,
    check_run_id,
    error_body,
    json_body,
    only_keys,
    query_float,
    query_int,
)
from dandelion_p2p.webui.prometheus import CONTENT_TYPE, render_metrics
from dandelion_p2p.webui.scrubbing import SecretScrubber

log = logging.getLogger(__name__)

MAX_LOG_LINES = 5000
MAX_POINTS = 10_000
HANDLER_TIMEOUT = 15.0
MEMBERS_TTL = 10.0
RUNCONFIG_TTL = 30.0
LEVELS = ("debug", "info", "warning", "error", "critical")
SERIES_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
UPNP_NOTE = (
    "Port forwarding is an explicit opt-in read at start: set upnp = true in the config file "
    "(or pass --upnp) and restart the daemon to change it."
)
OPTIONAL_METHODS = (
    "training.status",
    "training.start",
    "training.stop",
    "run.join",
    "runs.list",
    "runconfig.get",
    "runconfig.publish",
    "dataset.status",
)


class WebApi:
    def __init__(self, ctx: DaemonContext, scrubber: SecretScrubber) -> None:
        self.ctx = ctx
        self.scrubber = scrubber
        # Pages poll every few seconds; answers that cost DHT lookups are reused a while.
        self._cache: dict[str, tuple[float, Any]] = {}

    async def cached(self, key: str, ttl: float, fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = trio.current_time()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        value = await fetch()
        self._cache[key] = (now, value)
        return value

    # ---- plumbing ----------------------------------------------------------------------------

    def out(self, content: Any, status: int = 200) -> JSONOut:
        return JSONOut(content, self.scrubber, status)

    def available(self, method: str) -> bool:
        return method in self.ctx.handlers

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Run a control method; its failures become ``ApiError`` with the method's message."""
        handler = self.ctx.handlers.get(method)
        if handler is None:
            raise ApiError(501, f"{method} is not available on this node", "unavailable")
        try:
            with trio.fail_after(HANDLER_TIMEOUT):
                return await handler(params or {})
        except trio.TooSlowError:
            raise ApiError(504, f"{method} did not answer within {HANDLER_TIMEOUT:g} s") from None
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        except PeerUnavailable as exc:
            raise ApiError(503, f"{method}: {exc}") from None
        except (RemoteRejected, ProtocolViolation) as exc:
            raise ApiError(502, f"{method}: {exc}") from None
        except DandelionError as exc:
            raise ApiError(409, str(exc)) from None

    def routes(self) -> list[BaseRoute]:
        def get(path: str, fn: Callable[[Request], Awaitable[Any]]) -> Route:
            return Route(path, self._wrap(fn), methods=["GET"])

        def post(path: str, fn: Callable[[Request], Awaitable[Any]]) -> Route:
            return Route(path, self._wrap(fn), methods=["POST"])

        return [
            get("/api/overview", self.overview),
            get("/api/status", self.status),
            get("/api/peers", self.peers),
            get("/api/network", self.network),
            get("/api/logs", self.logs),
            WebSocketRoute("/api/logs/live", self.logs_live),
            get("/api/telemetry", self.telemetry_index),
            get("/api/telemetry/{name}", self.telemetry_series),
            get("/api/settings", self.settings_get),
            post("/api/settings", self.settings_set),
            get("/api/training", self.training_status),
            post("/api/training/start", self.training_start),
            post("/api/training/stop", self.training_stop),
            get("/api/runs", self.runs_list),
            post("/api/runs/join", self.run_join),
            get("/api/runconfig", self.runconfig_get),
            post("/api/runconfig", self.runconfig_publish),
            get("/api/dataset", self.dataset_status),
            get("/api/samples", self.samples_list),
            Route("/api/samples/{name}", self.sample_image, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    def _wrap(self, fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return self.out(await fn(request))
            except ApiError as exc:
                return self.out(error_body(exc.message, exc.code), exc.status)

        return endpoint

    # ---- node --------------------------------------------------------------------------------

    async def status(self, request: Request) -> Any:
        return self.ctx.status()

    async def overview(self, request: Request) -> Any:
        status = self.ctx.status()
        training: dict[str, Any] = {"available": self.available("training.status")}
        if training["available"]:
            try:
                training.update(await self.call("training.status"))
            except ApiError as exc:
                training["error"] = exc.message
            except Exception as exc:
                # Another subsystem's bug must not take the whole dashboard down with it.
                log.exception("web UI: training.status failed")
                training["error"] = f"training.status failed: {type(exc).__name__}: {exc}"
        max_steps = None
        run = self.ctx.config.run or str(training.get("run") or "")
        if run and self.available("runconfig.get"):
            try:
                got = await self.cached(
                    f"runconfig:{run}", RUNCONFIG_TTL,
                    lambda: self.call("runconfig.get", {"run": run}),
                )
                max_steps = got.get("config", {}).get("training", {}).get("max_steps")
            except Exception:
                max_steps = None  # progress then shows the step without a total
        return {
            "node": {
                key: status.get(key)
                for key in (
                    "peer_id", "version", "network", "relay", "reachable", "dht_mode",
                    "uptime_s", "routing_table_size", "stored_records", "addrs",
                )
            }
            | {
                "connected_peers": len(status["connected_peers"]),
                "relay_reservations": len(status["relay_reservations"]),
            },
            "run": run,
            "worker": self.ctx.config.worker,
            "training": training,
            "max_steps": max_steps if isinstance(max_steps, int) else None,
            "methods": {m: self.available(m) for m in OPTIONAL_METHODS},
        }

    async def peers(self, request: Request) -> Any:
        status = self.ctx.status()
        members: dict[str, Any] = {}
        members_error = None
        try:
            found = await self.cached("members", MEMBERS_TTL, lambda: self.call("members"))
            members = found.get("members", {})
        except ApiError as exc:
            members_error = exc.message
        rows: dict[str, dict[str, Any]] = {}

        def row(peer: str) -> dict[str, Any]:
            if peer not in rows:
                rows[peer] = {
                    "peer_id": peer,
                    "self": peer == status["peer_id"],
                    "connected": False,
                    "connection": None,
                    "addrs": [],
                    "announced_addrs": [],
                    "reachable": None,
                    "roles": [],
                    "member": False,
                    "score": None,
                    "banned_until": None,
                    "bans": 0,
                    "violations": status["violations"].get(peer, 0),
                    "bandwidth_mbps": None,
                }
            return rows[peer]

        for conn in status["connected_peers"]:
            r = row(conn["peer_id"])
            r.update(
                connected=True,
                connection=conn["connection"],
                addrs=conn["addrs"],
                bandwidth_mbps=conn.get("bandwidth_mbps"),
            )
        for peer, ann in members.items():
            r = row(peer)
            r.update(
                member=True,
                announced_addrs=ann.get("addrs", []),
                reachable=ann.get("reachable"),
                roles=ann.get("roles", []),
            )
        for standing in status["scores"]:
            r = row(standing["peer"])
            r.update(
                score=standing["score"],
                banned_until=standing["banned_until"],
                bans=standing["bans"],
            )
        ordered = sorted(
            rows.values(), key=lambda r: (not r["self"], not r["connected"], r["peer_id"])
        )
        return {"peers": ordered, "members_error": members_error}

    async def network(self, request: Request) -> Any:
        status = self.ctx.status()
        config = self.ctx.config
        return {
            "listen_addrs": status["listen_addrs"],
            "addrs": status["addrs"],
            "reachable": status["reachable"],
            "reachability_setting": config.reachability,
            "relay": config.relay,
            "relays_wanted": config.relays,
            "relay_reservations": status["relay_reservations"],
            "dht_mode": status["dht_mode"],
            "port_mapping": {
                "enabled": config.upnp,
                "state": status["port_mapping"],
                "mapped_addrs": status["mapped_addrs"],
                "note": UPNP_NOTE,
            },
            "dataplane": {
                "port": self.ctx.dataplane.bound_port,
                "advertise": self.ctx.dataplane.advertise,
            },
            "webui": {"host": config.webui_host, "port": config.webui_port},
        }

    # ---- logs --------------------------------------------------------------------------------

    def line_dict(self, line: LogLine) -> dict[str, Any]:
        data = line.to_dict()
        data["message"] = self.scrubber.scrub(line.message)
        return data

    async def logs(self, request: Request) -> Any:
        after = query_int(request, "after", 0, 0, 2**62)
        limit = query_int(request, "limit", 1000, 0, MAX_LOG_LINES)
        level = request.query_params.get("level", "debug").lower()
        if level not in LEVELS:
            raise ApiError(400, f"query parameter 'level' must be one of {', '.join(LEVELS)}")
        lowest = LEVELS.index(level)
        lines = [
            line
            for line in self.ctx.logs.lines(after=after, limit=MAX_LOG_LINES)
            if line.level not in LEVELS or LEVELS.index(line.level) >= lowest
        ][-limit:] if limit else []
        return {"lines": [self.line_dict(x) for x in lines], "last_seq": self.ctx.logs.last_seq}

    async def logs_live(self, websocket: WebSocket) -> None:
        """Every line from ``after`` on (scrollback first), then each new line as it is logged.
        Every open socket gets every line."""
        try:
            after = int(parse_qs(websocket.url.query).get("after", ["0"])[0])
        except ValueError:
            after = 0
        await websocket.accept()
        with self.ctx.logs.subscribe() as lines:
            sent = max(after, 0)
            try:
                async with trio.open_nursery() as nursery:

                    async def until_closed() -> None:
                        try:
                            while True:
                                await websocket.receive_text()
                        except (WebSocketDisconnect, RuntimeError, KeyError):
                            pass
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(until_closed)
                    for line in self.ctx.logs.lines(after=sent, limit=MAX_LOG_LINES):
                        await websocket.send_json(self.line_dict(line))
                        sent = line.seq
                    async for line in lines:
                        if line.seq > sent:
                            await websocket.send_json(self.line_dict(line))
                            sent = line.seq
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass

    # ---- telemetry and metrics ---------------------------------------------------------------

    async def telemetry_index(self, request: Request) -> Any:
        telemetry = self.ctx.telemetry
        out = []
        for name in telemetry.names():
            latest = telemetry.latest(name)
            out.append(
                {
                    "name": name,
                    "help": telemetry.help_text(name),
                    "latest": None if latest is None else [latest.time, latest.value],
                }
            )
        return {"series": out}

    async def telemetry_series(self, request: Request) -> Any:
        name = request.path_params["name"]
        if not SERIES_NAME.fullmatch(name):
            raise ApiError(400, "a series name is [a-z][a-z0-9_]*, at most 64 characters")
        if name not in self.ctx.telemetry.names():
            raise ApiError(404, f"no series named {name!r} (yet)")
        since = query_float(request, "since", 0.0)
        limit = query_int(request, "limit", 2000, 1, MAX_POINTS)
        points = self.ctx.telemetry.series(name, since=since)[-limit:]
        return {
            "name": name,
            "help": self.ctx.telemetry.help_text(name),
            "points": [[p.time, p.value] for p in points],
        }

    async def metrics(self, request: Request) -> Response:
        text = render_metrics(self.ctx.status(), self.ctx.telemetry)
        return Response(self.scrubber.scrub(text), media_type=CONTENT_TYPE)

    # ---- settings, training, runs ------------------------------------------------------------

    def _settings_out(self, settings: Any) -> dict[str, Any]:
        return {
            "settings": settings,
            "choices": {
                "device": list(DEVICES),
                "mixed_precision": list(PRECISIONS),
                "attention": list(ATTENTIONS),
            },
            "data_dir": str(self.ctx.config.data_dir),
        }

    async def settings_get(self, request: Request) -> Any:
        return self._settings_out(await self.call("settings.get"))

    async def settings_set(self, request: Request) -> Any:
        body = await json_body(request)
        only_keys(body, ("changes",))
        changes = body.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise ApiError(400, "'changes' must be a non-empty object of settings to change")
        return self._settings_out(await self.call("settings.set", {"changes": changes}))

    async def training_status(self, request: Request) -> Any:
        return await self.call("training.status")

    async def samples_list(self, request: Request) -> Any:
        if not self.available("training.samples"):
            return {"samples": []}
        got = await self.call("training.samples")
        return {"samples": got.get("samples", [])}

    async def sample_image(self, request: Request) -> Response:
        """One of the listed sample images, as PNG bytes: only a name the worker's folder
        lists is read, so no path reaches the disk from the request."""
        name = request.path_params.get("name", "")
        try:
            got = await self.call("training.samples")
        except ApiError as exc:
            return self.out(error_body(exc.message, exc.code), exc.status)
        listed = {s.get("name") for s in got.get("samples", [])}
        if name not in listed:
            return self.out(error_body("no such sample image", "not_found"), 404)
        try:
            data = await trio.to_thread.run_sync(_read_sample, Path(got["folder"]) / name)
        except OSError:
            return self.out(error_body("no such sample image", "not_found"), 404)
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    async def training_start(self, request: Request) -> Any:
        await self._empty_body(request)
        return await self.call("training.start")

    async def training_stop(self, request: Request) -> Any:
        await self._empty_body(request)
        return await self.call("training.stop")

    async def _empty_body(self, request: Request) -> None:
        if request.headers.get("content-type"):
            only_keys(await json_body(request), ())

    async def runs_list(self, request: Request) -> Any:
        return await self.call("runs.list")

    async def run_join(self, request: Request) -> Any:
        body = await json_body(request)
        only_keys(body, ("run",))
        return await self.call("run.join", {"run": check_run_id(body.get("run"))})

    async def runconfig_get(self, request: Request) -> Any:
        raw = request.query_params.get("run")
        # Without a run the owner of runconfig.get picks this node's own: the one it joined,
        # or the one it serves.
        params = {} if raw is None else {"run": check_run_id(raw)}
        return await self.call("runconfig.get", params)

    async def runconfig_publish(self, request: Request) -> Any:
        body = await json_body(request)
        only_keys(body, ("toml",))
        toml = body.get("toml")
        if not isinstance(toml, str) or not toml.strip():
            raise ApiError(400, "'toml' must be the run config as non-empty TOML text")
        return await self.call("runconfig.publish", {"toml": toml})

    async def dataset_status(self, request: Request) -> Any:
        return await self.call("dataset.status")


MAX_SAMPLE_BYTES = 32 * 1024 * 1024


def _read_sample(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(MAX_SAMPLE_BYTES + 1)
    if len(data) > MAX_SAMPLE_BYTES:
        raise OSError(f"{path} is over {MAX_SAMPLE_BYTES} bytes")
    return data
