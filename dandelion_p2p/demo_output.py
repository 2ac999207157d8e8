"""What ``make demo`` leaves behind: the output folder, its checks, and the login link it prints.

The demo trains in a temporary folder that it deletes; this module copies what is worth
keeping (every peer's sample images, the exported model of one peer) into a folder the user
names, checks that the model loads back in diffusers, and writes ``demo-summary.json``, which
also marks the folder as the demo's own so a later run may replace it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SUMMARY = "demo-summary.json"
# The subfolders a run writes; a rerun replaces them and leaves anything else alone.
OWNED = ("samples", "model")


class OutputFolderError(Exception):
    """The output folder holds files the demo did not write."""


def prepare_output(folder: Path) -> Path:
    """Create ``folder``, or empty the parts of an earlier demo's output; refuse a non-empty
    folder that no demo wrote, so a mistyped path never loses someone's files."""
    folder = folder.expanduser().resolve()
    if folder.exists():
        if not folder.is_dir():
            raise OutputFolderError(f"{folder} exists and is not a folder")
        if any(folder.iterdir()) and not (folder / SUMMARY).is_file():
            raise OutputFolderError(
                f"{folder} is not empty and holds no {SUMMARY}: give another folder with "
                "--output, or empty it")
        for name in OWNED:
            shutil.rmtree(folder / name, ignore_errors=True)
        (folder / SUMMARY).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def login_link(data_dir: Path, url: str) -> str | None:
    """The web UI address with the access token, as the daemon logs it; None when the UI is
    off or its token file is missing."""
    if not url.startswith("http"):
        return None
    try:
        token = (data_dir / "webui.token").read_text().strip()
    except FileNotFoundError:
        return None
    return f"{url}?token={token}" if token else None


def check_login(link: str) -> str | None:
    """None when opening ``link`` logs a browser in (the token answered with the login cookie,
    the page then served with it); otherwise what went wrong."""
    import http.cookiejar
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        with opener.open(link, timeout=30) as page:
            body = page.read(1 << 20).decode("utf-8", "replace")
            status, final = page.status, page.url
    except (OSError, urllib.error.URLError) as exc:
        return f"the login link does not open: {exc}"
    if status != 200 or "token=" in final or "<html" not in body.lower():
        return f"the login link did not log in (HTTP {status} at {final.split('?')[0]})"
    return None


def newest_export(work: Path) -> Path | None:
    exports = sorted(p for p in (work / "export").glob("*-step-*") if p.is_dir())
    return exports[-1] if exports else None


def check_export(model: Path) -> str | None:
    """None when the exported diffusers folder loads as a pipeline and the single file is
    there; otherwise what is wrong."""
    if not (model / "export.json").is_file():
        return f"{model} has no export.json"
    folder = model / "diffusers"
    if not folder.is_dir():
        return f"{model} has no diffusers folder"
    singles = list(model.glob("*.safetensors"))
    if not singles:
        return f"{model} has no single-file checkpoint"
    try:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    except Exception as exc:  # whatever diffusers raises, the demo reports it and fails
        return f"the exported model does not load in diffusers: {type(exc).__name__}: {exc}"
    if pipe.unet is None or pipe.vae is None or pipe.text_encoder is None:
        return "the exported pipeline lacks a UNet, VAE or text encoder"
    return None


def keep_results(output: Path, works: dict[str, Path]) -> tuple[dict[str, Any], list[str]]:
    """Copy each peer's sample images to ``output/samples/<peer>/`` and the first peer's
    exported model to ``output/model/``; returns what was kept and the problems found."""
    problems: list[str] = []
    kept: dict[str, Any] = {"samples": {}, "model": None}
    for name, work in works.items():
        images = sorted((work / "samples").glob("*.png"))
        if not images:
            problems.append(f"{name} wrote no sample images")
            continue
        target = output / "samples" / name
        target.mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copy2(image, target / image.name)
        kept["samples"][name] = [str(target / image.name) for image in images]
    exporters = [(name, newest_export(work)) for name, work in works.items()]
    found = [(name, path) for name, path in exporters if path is not None]
    for name, path in exporters:
        if path is None:
            problems.append(f"{name} exported no model")
    if found:
        name, source = found[0]
        model = output / "model"
        shutil.copytree(source, model)
        problem = check_export(model)
        if problem:
            problems.append(problem)
        kept["model"] = {"path": str(model), "from": name, "export": source.name}
    return kept, problems


def write_summary(output: Path, summary: dict[str, Any]) -> Path:
    path = output / SUMMARY
    path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return path
