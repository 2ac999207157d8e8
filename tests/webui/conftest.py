"""Two real daemons on loopback shared by the web UI tests: a relay, and a peer behind it
that serves the web UI on a free port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.daemon_proc import DaemonProcess, start_daemon

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@dataclass
class WebSwarm:
    relay: DaemonProcess
    peer: DaemonProcess
    """Serves the web UI."""
    url: str
    """``http://127.0.0.1:PORT/``, as the daemon reports it (no token)."""
    token: str
    base: Path
    """Where the run config names the tiny model (``base/tiny-sd1``)."""


def _stop(daemon: DaemonProcess) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.terminate()
        try:
            daemon.proc.wait(10)
        except Exception:
            daemon.proc.kill()
            daemon.proc.wait()


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


RUN_CONFIG = """\
name = "webui-tiny"

[model]
base = "{model}"

[training]
method = "full"
resolution = 64
bucket_min = 64
bucket_max = 128
batch_size = 2
max_steps = 100000
seed = 7

[optimizer]
name = "adamw"
lr = 0.001

[sync]
local_steps = 100000

[averaging]
codec = "none"

[checkpoint]
every_steps = 100000
keep_last = 1
"""


def write_captioned_images(folder: Path, count: int) -> None:
    """Random 64x64 images with a caption file each, as the worker reads a folder."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a random picture number {i}")


def prepare_training(base: Path, data_dir: Path) -> list[str]:
    """A run config and captioned images where the worker looks for them, and the flags that
    point the peer at them. The run's tiny model is built only by the test that trains
    (``base/tiny-sd1``); the worker is not started until that test presses Start."""
    write_captioned_images(data_dir / "training-data", 8)
    (base / "run.toml").write_text(RUN_CONFIG.format(model=base / "tiny-sd1"))
    (base / "peer.toml").write_text('run_config = "run.toml"\n')
    return ["--config", str(base / "peer.toml"), "--no-worker"]


@pytest.fixture(scope="package")
def web_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebSwarm]:
    base: Path = tmp_path_factory.mktemp("webui")
    training = prepare_training(base, base / "peer")
    relay = start_daemon("daemon", ["--relay", "--listen", LOOPBACK], base / "relay")
    peer = None
    try:
        peer = start_daemon(
            "join",
            [relay.addrs[0], "--reachability", "private", "--listen", LOOPBACK,
             "--webui-port", "0", *training],
            base / "peer",
        )
        status = peer.call("status")
        url = status["webui"]["url"]
        assert url and url.startswith("http://127.0.0.1:"), status["webui"]
        token = (base / "peer" / "webui.token").read_text().strip()
        yield WebSwarm(relay, peer, url, token, base)
    finally:
        try:
            if peer is not None and peer.proc.poll() is None:
                # The web UI (hypercorn, live log sockets) must not hold up a clean stop.
                code, took = peer.stop()
                assert code == 0 and took < 5.0, (code, took, peer.logs()[-3000:])
        finally:
            if peer is not None:
                _stop(peer)
            _stop(relay)
