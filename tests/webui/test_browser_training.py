"""The web UI of a node that serves a dataset and whose worker trained with a validation
split, in a real headless Chromium: the dataset card shows structured values, the dashboard
the validation loss and the last round, and the charts draw the series the worker reported
(the same values as its TensorBoard event files). Screenshots go to
``tests/artifacts/webui/``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dandelion_p2p.worker.tensorboard_log import TAGS
from dandelion_p2p.worker.tiny import build_tiny_pipeline
from tests.daemon_proc import DaemonProcess, start_daemon
from tests.webui.conftest import LOOPBACK, _stop, write_captioned_images
from tests.webui.test_browser import (
    ARTIFACTS,
    CHROMIUM,
    TIMEOUT_MS,
    browser,  # noqa: F401  (the module's Chromium, a fixture)
    screenshot,
    wait_for_js,
)
from tests.worker.runconfigs import tiny_run

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium"),
    pytest.mark.slow,  # a worker trains four steps before the first page opens
]

TRAINING_SERIES = ("loss", "validation_loss", "learning_rate", "samples_per_second",
                   "global_step", "round_seconds", "fraction_averaged", "round_peers")


@dataclass
class TrainedNode:
    daemon: DaemonProcess
    url: str
    token: str
    run: str
    work: Path
    worker_stderr: str

    def api(self, path: str) -> Any:
        answer = httpx.get(f"{self.url}{path.lstrip('/')}", timeout=20,
                           headers={"authorization": f"Bearer {self.token}"})
        answer.raise_for_status()
        return answer.json()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedNode]:
    """A relay serving the run and its packed dataset, and a peer behind it serving the web
    UI: the peer leases and fetches a chunk, and a worker started by hand on the peer trains
    four steps on a local folder, validating every two on its held-out split."""
    base = tmp_path_factory.mktemp("webui-trained")
    model = build_tiny_pipeline(base / "model", "sd1")
    images, relay_dir, peer_dir = base / "images", base / "relay", base / "peer"
    write_captioned_images(images, 12)
    subprocess.run(
        [sys.executable, "-m", "dandelion_p2p.cli", "dataset", "pack", str(images),
         str(base / "packed"), "--chunk-size", "100k", "--data-dir", str(relay_dir)],
        check=True, capture_output=True, text=True, timeout=300)
    config = tiny_run(model, training={"max_steps": 4}, sync={"local_steps": 2},
                      checkpoint={"every_steps": 2},
                      validation={"every_steps": 2, "split": 0.3})
    (base / "run.toml").write_text(config.to_toml())
    relay = start_daemon(
        "daemon", ["--relay", "--listen", LOOPBACK, "--no-worker", "--run-config",
                   str(base / "run.toml"), "--dataset", str(base / "packed")], relay_dir)
    peer = None
    try:
        run = relay.call("dataset.status")["run"]
        peer = start_daemon(
            "join", [relay.addrs[0], "--reachability", "private", "--listen", LOOPBACK,
                     "--run", run, "--no-worker", "--webui-port", "0"], peer_dir)
        url = peer.call("status")["webui"]["url"]
        token = (peer_dir / "webui.token").read_text().strip()
        lease = peer.call("dataset.lease", {"run": run, "wait": 60}, timeout=120)
        peer.call("dataset.fetch", {"run": run, "chunk": lease["chunk"], "size": lease["size"]},
                  timeout=120)
        worker = subprocess.run(
            [sys.executable, "-m", "dandelion_p2p.cli", "worker", "--data-dir", str(peer_dir),
             "--data", str(images), "--no-export", "--device", "cpu"],
            capture_output=True, text=True, timeout=600)
        assert worker.returncode == 0, worker.stderr[-4000:]
        yield TrainedNode(peer, url, token, run, peer_dir / "worker" / config.name,
                          worker.stderr)
    finally:
        if peer is not None:
            _stop(peer)
        _stop(relay)


@pytest.fixture(scope="module")
def context(browser: Any, trained: TrainedNode) -> Iterator[Any]:  # noqa: F811
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{trained.url}?token={trained.token}")
    page.close()
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        page.close()
    assert not errors, f"JavaScript errors: {errors}"


def open_page(page: Any, node: TrainedNode, name: str) -> None:
    page.goto(f"{node.url}#{name}")
    page.wait_for_selector(f"#page-{name}:not(.hidden)")


def test_the_worker_starts_without_third_party_noise(trained: TrainedNode) -> None:
    assert "requires torchvision" not in trained.worker_stderr
    assert "Loading pipeline components" not in trained.worker_stderr
    assert "validation loss" in trained.worker_stderr


def test_dataset_card_shows_structured_values(page: Any, trained: TrainedNode) -> None:
    status = trained.daemon.call("dataset.status")
    assert status["clients"][trained.run]["cached_chunks"] == 1, status
    open_page(page, trained, "dashboard")
    row = page.locator(f'#dataset-runs tr[data-run="{trained.run}"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    client = status["clients"][trained.run]
    assert cells == [trained.run, str(client["cached_chunks"]), str(client["rejected_holders"]),
                     str(status["watching"].get(trained.run, "—"))], cells
    card = page.inner_text("#dataset-facts") + page.inner_text("#dataset-runs")
    assert not any(c in card for c in '{}"'), f"raw JSON in the dataset card: {card}"
    facts = dict(zip(page.locator("#dataset-facts > dt").all_inner_texts(),
                     page.locator("#dataset-facts > dd").all_inner_texts(), strict=True))
    assert facts == {"Role": "serves no dataset",
                     "Leases held for the worker": str(status["open_leases"])}, facts
    # No value is squeezed into a column one character wide.
    widths = page.evaluate(
        "() => Array.from(document.querySelectorAll('#dataset-facts > dd'))"
        ".map(d => d.getBoundingClientRect().width)")
    assert min(widths) > 100, widths
    screenshot(page, "dashboard-dataset")


def test_dashboard_shows_validation_and_the_last_round(page: Any,
                                                       trained: TrainedNode) -> None:
    training = trained.daemon.call("training.status")
    assert training["validation_step"] == 4 and training["last_round"]["round"] == 2
    open_page(page, trained, "dashboard")
    page.locator("#training-facts", has_text="Validation loss").wait_for()
    facts = page.inner_text("#training-facts")
    assert f"{training['validation_loss']:.4f} at step 4" in facts, facts
    rate = page.evaluate("v => v.toExponential(2)", training["learning_rate"])
    assert f"Learning rate\n{rate}" in facts and rate.startswith("1.00e-3"), facts
    contribution = page.inner_text("#contribution-facts")
    assert "round 2, not averaged" in contribution, contribution
    # Alone in its rounds: no peer took part, and the page says so rather than a count.
    assert training["last_round"]["peers"] == []
    assert "Peers in round\nnone" in contribution, contribution


def test_charts_draw_the_series_the_worker_reported(page: Any, trained: TrainedNode) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    open_page(page, trained, "charts")
    for name in TRAINING_SERIES:
        wait_for_js(page, "n => Number(document.querySelector(`.chart-card[data-series=${n}]`)"
                          "?.getAttribute('data-points')) > 0", name)
    # The validation losses of steps 2 and 4, as the worker's TensorBoard files hold them.
    events = accumulator.EventAccumulator(str(trained.work / "tensorboard"))
    events.Reload()
    board = [e.value for e in events.Scalars(TAGS["validation_loss"])]
    charted = [v for _, v in trained.api("/api/telemetry/validation_loss")["points"]]
    assert charted == pytest.approx(board) and len(charted) == 2
    card = page.locator('.chart-card[data-series="validation_loss"]')
    assert card.get_attribute("data-points") == "2"
    latest = page.evaluate("v => window.DandelionChart.fmtValue(v)", charted[-1])
    assert card.locator(".latest").inner_text() == latest
    # Each chart's line is drawn: pixels of the line colour (#d48a00) on its canvas.
    drawn = page.evaluate(
        """names => names.map(n => {
            const c = document.querySelector(`.chart-card[data-series=${n}] canvas`);
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let k = 0;
            for (let i = 0; i < px.length; i += 4) {
              if (px[i] > 180 && px[i + 1] > 100 && px[i + 1] < 170 && px[i + 2] < 60) k++;
            }
            return k;
        })""", list(TRAINING_SERIES))
    assert all(k > 20 for k in drawn), dict(zip(TRAINING_SERIES, drawn, strict=True))
    screenshot(page, "charts-validation")
