"""The web UI in a real headless Chromium against a running daemon: every page works and is
saved as a screenshot under ``tests/artifacts/webui/``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dandelion_p2p.control.protocol import CommandFailed
from tests.webui.conftest import RUN_CONFIG, WebSwarm, wait_until

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "webui"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def context(browser: Any, web_swarm: WebSwarm) -> Iterator[Any]:
    """A browser profile logged in through the URL the daemon logs."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{web_swarm.url}?token={web_swarm.token}")
    assert web_swarm.token not in page.url, "the login redirect drops the token from the URL"
    page.close()
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context: Any, web_swarm: WebSwarm) -> Iterator[Any]:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        page.close()
    assert not errors, f"JavaScript errors: {errors}"


def open_page(page: Any, swarm: WebSwarm, name: str) -> None:
    page.goto(f"{swarm.url}#{name}")
    page.wait_for_selector(f"#page-{name}:not(.hidden)")


def wait_for_js(page: Any, expression: str, arg: Any = None) -> None:
    """Poll ``expression`` until it is truthy. (``page.wait_for_function`` evaluates strings
    inside the page, which the UI's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.2)


def screenshot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def node_methods(swarm: WebSwarm) -> dict[str, bool]:
    """Which optional control methods the daemon offers, as the dashboard learns it."""
    answer = httpx.get(f"{swarm.url}api/overview",
                       headers={"authorization": f"Bearer {swarm.token}"}, timeout=20)
    methods: dict[str, bool] = answer.json()["methods"]
    return methods


def training_methods_present(swarm: WebSwarm) -> bool:
    try:
        swarm.peer.call("training.status")
    except CommandFailed:
        return False
    return True


def test_dashboard_shows_this_node(page: Any, web_swarm: WebSwarm) -> None:
    open_page(page, web_swarm, "dashboard")
    facts = page.locator("#node-facts")
    facts.get_by_text(web_swarm.peer.peer_id).wait_for()
    assert "behind NAT" in facts.inner_text()
    page.locator("#conn-state", has_text="connected").wait_for()
    # The dataset card: labelled values, never a raw JSON text.
    page.locator("#dataset-facts dt", has_text="Role").wait_for()
    card = page.inner_text("#dataset-facts") + page.inner_text("#dataset-runs")
    assert not any(c in card for c in '{}"'), card
    # The sample images card: the worker's newest images, or what to do to get some.
    wait_for_js(page, "document.querySelector('#samples').children.length > 0")
    samples = page.inner_text("#samples")
    assert page.locator("#samples img").count() > 0 or "sample_every" in samples, samples
    screenshot(page, "dashboard")


def test_peers_table_lists_the_other_daemon(page: Any, web_swarm: WebSwarm) -> None:
    open_page(page, web_swarm, "peers")
    row = page.locator(f'#peers-table tr[data-peer="{web_swarm.relay.peer_id}"]')
    row.wait_for()
    text = row.inner_text()
    assert "direct" in text and "relay" in text, text
    screenshot(page, "peers")


def test_a_chart_gains_points(page: Any, web_swarm: WebSwarm) -> None:
    open_page(page, web_swarm, "charts")
    card = page.locator('.chart-card[data-series="connected_peers"]')
    card.wait_for()
    wait_for_js(
        page,
        "Number(document.querySelector('.chart-card[data-series=connected_peers]')"
        ".getAttribute('data-points')) > 0",
    )
    before = int(card.get_attribute("data-points"))
    wait_for_js(
        page,
        "n => Number(document.querySelector('.chart-card[data-series=connected_peers]')"
        ".getAttribute('data-points')) > n",
        before,
    )
    assert int(card.get_attribute("data-points")) > before
    screenshot(page, "charts")


def test_local_setting_changed_and_persisted(page: Any, web_swarm: WebSwarm) -> None:
    open_page(page, web_swarm, "config")
    page.locator("#setting-micro_batch").wait_for()
    page.fill("#setting-micro_batch", "99999")
    page.click("#settings-save")
    page.locator("#settings-message.error", has_text="micro_batch must be").wait_for()
    assert web_swarm.peer.call("settings.get")["micro_batch"] != 99999

    page.fill("#setting-micro_batch", "6")
    page.select_option("#setting-device", "cpu")
    page.click("#settings-save")
    page.locator("#settings-message.ok", has_text="Saved").wait_for()
    saved = web_swarm.peer.call("settings.get")
    assert saved["micro_batch"] == 6 and saved["device"] == "cpu"
    screenshot(page, "configuration")


def test_start_and_stop_training(page: Any, web_swarm: WebSwarm) -> None:
    open_page(page, web_swarm, "dashboard")
    page.locator("#node-facts dd").first.wait_for()
    if not training_methods_present(web_swarm):
        # This node has no training service: the page says so and offers no controls.
        page.locator("#training-unavailable:not(.hidden)").wait_for()
        assert "not available on this node" in page.inner_text("#training-unavailable")
        assert page.is_disabled("#training-start") and page.is_disabled("#training-stop")
        assert "not available on this node" in page.inner_text("#progress-text")
        return

    def state() -> str:
        return str(web_swarm.peer.call("training.status")["state"])

    from dandelion_p2p.worker.tiny import build_tiny_pipeline

    build_tiny_pipeline(web_swarm.base / "tiny-sd1", "sd1")

    page.locator("#training-start:not([disabled])").wait_for()
    assert state() == "idle"
    page.click("#training-start")
    wait_until(lambda: state() == "training", 60, "the worker to train")
    page.locator("#training-facts", has_text="training").wait_for()
    page.locator("#training-stop:not([disabled])").wait_for()
    wait_until(lambda: web_swarm.peer.call("training.status")["step"] >= 1, 60, "a step")
    wait_for_js(page, "!/Loss\\s+—/.test(document.getElementById('training-facts').innerText)")
    screenshot(page, "dashboard-training")

    page.click("#training-stop")
    wait_until(lambda: state() == "stopped", 60, "the worker to stop")
    page.locator("#training-facts", has_text="stopped on request").wait_for()
    page.locator("#training-start:not([disabled])").wait_for()
    assert page.is_disabled("#training-stop")

    # The steps it took are charted.
    open_page(page, web_swarm, "charts")
    wait_for_js(
        page,
        "Number(document.querySelector('.chart-card[data-series=loss]')"
        "?.getAttribute('data-points')) > 0",
    )
    screenshot(page, "charts-training")


def test_two_tabs_receive_the_same_new_log_line(context: Any, web_swarm: WebSwarm) -> None:
    tabs = [context.new_page(), context.new_page()]
    try:
        for tab in tabs:
            open_page(tab, web_swarm, "logs")
            tab.locator("#log-live", has_text="live").wait_for()
        marker = f"note-{uuid.uuid4().hex[:12]}"
        web_swarm.relay.call("send", {"peer": web_swarm.peer.peer_id, "text": marker})
        seqs = []
        for tab in tabs:
            line = tab.locator("#log-terminal .line", has_text=marker)
            line.wait_for()
            seqs.append(line.get_attribute("data-seq"))
        assert seqs[0] == seqs[1], "both tabs show the same numbered line"
        # Each tab also got the scrollback from before it opened.
        for tab in tabs:
            started = tab.locator("#log-terminal .line", has_text="web UI service started")
            assert started.count() == 1
        # Filtering by level hides info lines but keeps them for later.
        tabs[0].select_option("#log-level", "warning")
        assert tabs[0].locator("#log-terminal .line", has_text=marker).count() == 0
        screenshot(tabs[1], "logs")
    finally:
        for tab in tabs:
            tab.close()


def test_networking_shows_the_relay_reservation(page: Any, web_swarm: WebSwarm) -> None:
    open_page(page, web_swarm, "network")
    page.locator("#net-relays td.mono").first.wait_for()
    assert page.locator("#net-relays td.mono").first.get_attribute("title") == (
        web_swarm.relay.peer_id
    )
    assert "off" in page.inner_text("#net-portmap")
    assert "restart" in page.inner_text("#net-portmap-note")
    screenshot(page, "networking")


def test_runs_page_joins_a_run_with_one_click(page: Any, web_swarm: WebSwarm) -> None:
    try:
        web_swarm.peer.call("runs.list")
    except CommandFailed:
        open_page(page, web_swarm, "runs")
        page.locator("#runs-unavailable:not(.hidden)").wait_for()
        screenshot(page, "runs")
        return
    # The relay publishes a run; the peer finds it in the DHT and joins it from the page.
    toml = RUN_CONFIG.format(model="/nonexistent/model").replace("webui-tiny", "webui-listed")
    published = web_swarm.relay.call("runconfig.publish", {"toml": toml})
    run = published["run"]
    open_page(page, web_swarm, "runs")
    row = page.locator(f'#runs-table tr[data-run="{run}"]')
    row.wait_for()
    assert "webui-listed" in row.inner_text()
    screenshot(page, "runs")
    if not training_methods_present(web_swarm):
        assert row.locator("button").is_disabled()  # nothing here can join a run
        return
    try:
        row.locator("button", has_text="Join").click()
        page.locator("#runs-message.ok", has_text=f"Joined run {run}").wait_for()
        assert web_swarm.peer.call("training.status")["run"] == run
        row.locator("button", has_text="Joined").wait_for()
    finally:
        web_swarm.peer.call("training.stop", timeout=60)
        wait_until(
            lambda: web_swarm.peer.call("training.status")["state"]
            not in ("starting", "training", "syncing", "stopping"),
            60, "the worker to stop",
        )


def test_run_config_is_edited_and_published_by_its_owner_only(
    page: Any, web_swarm: WebSwarm
) -> None:
    present = node_methods(web_swarm)
    if not present["runconfig.get"]:
        open_page(page, web_swarm, "config")
        page.locator("#runconfig-message", has_text="not available on this node").wait_for()
        return
    if not present["run.join"]:
        pytest.skip("the page shows the config of the run joined: needs run.join")
    peer = web_swarm.peer
    try:
        # A run owned by the relay: shown read only.
        foreign = web_swarm.relay.call("runconfig.publish", {
            "toml": RUN_CONFIG.format(model="/nonexistent/a").replace("webui-tiny", "foreign")
        })["run"]
        peer.call("run.join", {"run": foreign})
        open_page(page, web_swarm, "config")
        page.locator("#runconfig-info", has_text="read only").wait_for()
        assert page.locator("#runconfig-toml").get_attribute("readonly") is not None
        assert page.locator("#runconfig-publish").is_hidden()

        # A run this node owns: edited in the page and published as a new version.
        own = peer.call("runconfig.publish", {
            "toml": RUN_CONFIG.format(model="/nonexistent/b").replace("webui-tiny", "mine")
        })["run"]
        peer.call("run.join", {"run": own})
        page.reload()
        page.locator("#runconfig-info", has_text="you may edit").wait_for()
        text = page.input_value("#runconfig-toml")
        assert 'name = "mine"' in text
        page.fill("#runconfig-toml", text.replace("lr = 0.001", "lr = 0.0005"))
        page.click("#runconfig-publish")
        page.locator("#runconfig-message.ok", has_text="Published version 2").wait_for()
        got = peer.call("runconfig.get", {"run": own})
        assert got["version"] == 2 and "lr = 0.0005" in got["toml"]
        screenshot(page, "configuration-owner")

        page.fill("#runconfig-toml", "name = ")
        page.click("#runconfig-publish")
        page.locator("#runconfig-message.error").wait_for()
        assert peer.call("runconfig.get", {"run": own})["version"] == 2
    finally:
        peer.call("training.stop", timeout=60)
        wait_until(
            lambda: peer.call("training.status")["state"]
            not in ("starting", "training", "syncing", "stopping"),
            60, "the worker to stop",
        )
