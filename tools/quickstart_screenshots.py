"""The web UI screenshots in docs/quickstart.md, taken from a live ``make demo``.

    .venv/bin/python tools/quickstart_screenshots.py [--out docs/img]

Runs the demo, opens alice's login link in headless Chromium (Debian's /usr/bin/chromium,
driven by playwright) while the swarm trains, and saves the dashboard, peers, networking and
charts pages as small palette PNGs. Exits non-zero when the demo fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
LINK = re.compile(r"alice's web UI while the demo runs: (http://\S+\?token=\S+)")
PAGES = ("dashboard", "peers", "network", "charts")


def shrink(path: Path) -> None:
    """256 colours are plenty for a UI of flat colours, and cut the file several times."""
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def shoot(link: str, out: Path, rounds_seen: threading.Event) -> list[Path]:
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page: Any = browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()
            page.set_default_timeout(30_000)
            page.goto(link)  # sets the login cookie and drops the token from the address
            page.locator("#conn-state", has_text="connected").wait_for()
            if not rounds_seen.wait(timeout=180):
                raise RuntimeError("the demo printed no second round within 180 s")
            for name in PAGES:
                page.goto(link.split("?", 1)[0] + "#" + name)
                page.locator("#conn-state", has_text="connected").wait_for()
                time.sleep(2.5)  # one refresh of every card and chart (every 2 s)
                path = out / f"webui-{name}.png"
                page.screenshot(path=str(path))
                shrink(path)
                saved.append(path)
        finally:
            browser.close()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kept = tempfile.TemporaryDirectory(prefix="dandelion-shots-")
    demo = subprocess.Popen(
        [sys.executable, "-m", "dandelion_p2p.demo", "--output", str(Path(kept.name) / "out")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each round as it is printed
    assert demo.stdout is not None
    link = ""
    rounds_seen = threading.Event()
    shots: list[Path] = []
    worker: threading.Thread | None = None
    for line in demo.stdout:
        print(line, end="")
        if not link and (found := LINK.search(line)):
            link = found.group(1)
            worker = threading.Thread(target=lambda url: shots.extend(
                shoot(url, args.out, rounds_seen)), args=(link,))
            worker.start()
        if ": round 2 of step " in line:  # as dandelion_p2p.demo prints each peer's round
            rounds_seen.set()
    rounds_seen.set()
    if worker is not None:
        worker.join()
    kept.cleanup()  # the demo's own output: only the screenshots are wanted here
    if demo.wait() != 0 or len(shots) != len(PAGES):
        raise SystemExit(f"demo exit code {demo.returncode}, {len(shots)} screenshots")
    for path in shots:
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
              f"{path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
