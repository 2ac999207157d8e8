"""The web UI service inside one trio loop with a real swarm node: it serves on a free port,
survives a busy port, stops with the daemon, and turns a failing control method into a 500
with a message while the node runs on."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from dandelion_p2p.config import DaemonConfig
from dandelion_p2p.context import DaemonContext
from dandelion_p2p.daemon import control_handlers
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.loghub import LogHub
from dandelion_p2p.node_metrics import NodeMetrics
from dandelion_p2p.telemetry import Telemetry
from dandelion_p2p.webui import service as webui_service
from dandelion_p2p.webui.app import build_app
from dandelion_p2p.webui.prometheus import render_metrics
from tests.swarm import public_settings, running_node


@asynccontextmanager
async def daemon_context(tmp_path: Path, **config: Any) -> AsyncIterator[DaemonContext]:
    settings = public_settings()
    async with running_node(settings) as node:
        ctx = DaemonContext(
            config=DaemonConfig(**{"data_dir": tmp_path, "webui_port": 0, **config}),
            identity=node.identity,
            node=node,
            dataplane=DataPlane(node.host, node.identity, listen_ip="127.0.0.1",
                                reachable=True),
            logs=LogHub(),
            telemetry=Telemetry(),
        )
        ctx.add_handlers(control_handlers(ctx))
        yield ctx


def test_other_interfaces_are_warned_about() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert webui_service.exposure_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "trainer.lan"):
        warning = webui_service.exposure_warning(host)
        assert warning is not None and host in warning
    assert webui_service.url_host("0.0.0.0") == "127.0.0.1"
    assert webui_service.url_host("::") == "[::1]"
    assert webui_service.url_host("fe80::1") == "[fe80::1]"


def test_create_follows_the_config(tmp_path: Path) -> None:
    class Ctx:
        config = DaemonConfig(data_dir=tmp_path, webui=False)

    assert webui_service.create(Ctx()) is None  # type: ignore[arg-type]


async def test_serves_on_a_free_port_and_stops_with_the_daemon(tmp_path: Path) -> None:
    async with daemon_context(tmp_path) as ctx:
        service = webui_service.create(ctx)
        assert service is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            url = ctx.status()["webui"]["url"]
            assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
            assert "token" not in str(ctx.status()["webui"])
            token = (tmp_path / "webui.token").read_text().strip()
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("api/status")).status_code == 401
                r = await client.get("api/status", headers={"authorization": f"Bearer {token}"})
                assert r.status_code == 200 and r.json()["peer_id"] == ctx.status()["peer_id"]
            auth = [(b"authorization", f"Bearer {token}".encode())]
            ws_url = url.replace("http://", "ws://") + "api/logs/live"
            async with open_websocket_url(ws_url, extra_headers=auth) as first, \
                    open_websocket_url(ws_url, extra_headers=auth) as second:
                ctx.logs.add("info", "test", "one line for every viewer")
                for viewer in (first, second):
                    with trio.fail_after(5):
                        while True:
                            line = json.loads(await viewer.get_message())
                            if line["message"] == "one line for every viewer":
                                break
                # Live viewers do not hold the daemon up: the service ends by itself once
                # ctx.shutdown is set, open sockets and all.
                with trio.fail_after(5):
                    ctx.shutdown.set()
                    while service.state != "stopped":
                        await trio.sleep(0.05)
            with pytest.raises(HandshakeError):
                async with open_websocket_url(ws_url, extra_headers=auth, connect_timeout=2):
                    pass
        assert service.state == "stopped"


async def test_live_logs_refuse_a_missing_token_or_foreign_origin(tmp_path: Path) -> None:
    async with daemon_context(tmp_path) as ctx:
        service = webui_service.create(ctx)
        assert service is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            url = ctx.status()["webui"]["url"]
            token = (tmp_path / "webui.token").read_text().strip()
            ws_url = url.replace("http://", "ws://") + "api/logs/live"
            for headers in (
                [],
                [(b"authorization", b"Bearer " + b"x" * 43)],
                [(b"authorization", f"Bearer {token}".encode()),
                 (b"origin", b"http://evil.example")],
            ):
                with pytest.raises(HandshakeError):
                    async with open_websocket_url(ws_url, extra_headers=headers):
                        pass
            nursery.cancel_scope.cancel()


async def test_busy_port_is_logged_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        async with daemon_context(tmp_path, webui_port=taken.getsockname()[1]) as ctx:
            service = webui_service.create(ctx)
            assert service is not None
            with caplog.at_level(logging.ERROR), trio.fail_after(5):
                await service.run()
            section = ctx.status()["webui"]
            assert section["url"] is None and section["state"] == "off"
            assert "cannot listen" in section["detail"]
            assert any("web UI not served" in r.getMessage() for r in caplog.records)
            assert ctx.node.status()["peer_id"]  # the node runs on
    finally:
        taken.close()


async def test_unexpected_error_is_a_500_with_a_message(tmp_path: Path) -> None:
    async with daemon_context(tmp_path) as ctx:

        async def broken(params: dict[str, Any]) -> dict[str, Any]:
            raise RuntimeError("the worker table is corrupt")

        ctx.add_handlers({"training.status": broken, "runs.list": broken})
        app = build_app(ctx, "k" * 43)
        transport = httpx.ASGITransport(app=app)
        headers = {"authorization": "Bearer " + "k" * 43}
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     headers=headers) as client:
            r = await client.get("/api/runs")
            assert r.status_code == 500
            assert "RuntimeError: the worker table is corrupt" in r.json()["error"]
            # The dashboard still renders, with the failure named.
            r = await client.get("/api/overview")
            assert r.status_code == 200
            assert "the worker table is corrupt" in r.json()["training"]["error"]
            assert (await client.get("/api/status")).status_code == 200


async def test_non_finite_numbers_from_a_subsystem_are_served_as_null(tmp_path: Path) -> None:
    async with daemon_context(tmp_path) as ctx:

        async def status(params: dict[str, Any]) -> dict[str, Any]:
            return {"state": "training", "loss": float("nan"), "samples_per_second": 1e309}

        ctx.add_handlers({"training.status": status})
        transport = httpx.ASGITransport(app=build_app(ctx, "k" * 43))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     headers={"authorization": "Bearer " + "k" * 43}) as client:
            r = await client.get("/api/training")
    assert r.status_code == 200
    assert r.json() == {"state": "training", "loss": None, "samples_per_second": None}


async def test_node_metrics_and_prometheus(tmp_path: Path) -> None:
    async with daemon_context(tmp_path) as ctx:
        metrics = NodeMetrics(ctx)
        metrics.record_once()
        metrics.record_once()
        assert len(ctx.telemetry.series("connected_peers")) == 2
        ctx.telemetry.record("loss", 0.25)
        text = render_metrics(ctx.status(), ctx.telemetry)
    lines = text.splitlines()
    assert "dandelion_loss 0.25" in lines
    assert "# TYPE dandelion_connected_peers gauge" in lines
    assert "# HELP dandelion_connected_peers peers with an open connection" in lines
    assert "dandelion_node_connected_peers 0.0" in lines
    for line in lines:
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("dandelion_")


async def test_sample_images_are_listed_and_served_and_nothing_else(tmp_path: Path) -> None:
    from PIL import Image

    from dandelion_p2p.sync.service import SyncService
    from dandelion_p2p.worker.protocol import SAMPLES_DIR, sample_file_name

    work = tmp_path / "work"
    samples = work / SAMPLES_DIR
    samples.mkdir(parents=True)
    written = {}
    for step, index in ((10, 0), (10, 1), (20, 0)):
        path = samples / sample_file_name(step, "ema", index)
        Image.new("RGB", (8, 8), (step, index * 100, 7)).save(path)
        written[path.name] = path.read_bytes()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    (samples / sample_file_name(30, "raw", 0)).symlink_to(secret)
    (samples / "notes.txt").write_text("not a sample")
    async with daemon_context(tmp_path / "data") as ctx:
        sync = SyncService(ctx)
        sync.current.checkpoint_dir = work / "checkpoints"
        transport = httpx.ASGITransport(app=build_app(ctx, "k" * 43))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     headers={"authorization": "Bearer " + "k" * 43}) as client:
            listed = (await client.get("/api/samples")).json()["samples"]
            images = {s["name"]: await client.get(f"/api/samples/{s['name']}") for s in listed}
            refused = [
                (await client.get(f"/api/samples/{name}")).status_code
                for name in (sample_file_name(30, "raw", 0), "notes.txt",
                             "..%2F..%2Fsecret.txt", sample_file_name(99, "ema", 0))
            ]
    assert [(s["step"], s["prompt"]) for s in listed] == [(20, 0), (10, 0), (10, 1)]
    for name, reply in images.items():
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
        assert reply.content == written[name]
    assert refused == [404, 404, 404, 404]
