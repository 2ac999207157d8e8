"""The checkpoints a daemon serves to joining peers, read from its worker's folder.

Each ``step-NNNNNNNN/`` folder the worker wrote is described once (its files' sizes, the
digests its ``manifest.json`` records, the manifest's own digest) and the description kept
while the manifest keeps its inode and modification time. Only the files a manifest lists,
and the manifest, are ever opened. Local files only: no network here.

A checkpoint being downloaded is **pinned**: its files are hard-linked into
``.pinned-step-NNNNNNNN/`` beside it at its first read, so that a joiner whose download
outlasts ``checkpoint.keep_last`` rounds still finishes after the worker has pruned the step.
A pin costs disk only once the worker has deleted the folder; at most ``MAX_PINS`` are kept,
each until ``PIN_IDLE`` seconds after its last read.

The averaged rounds the worker keeps for joiners (``rounds/round-RRRRRRRR-M.bin``, written by
``worker/served_rounds.py``) are served beside them (``RoundCatalog``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dandelion_p2p.hashing import file_digest
from dandelion_p2p.sync.statesync_core import MANIFEST, MAX_ROUNDS, STEP_DIR
from dandelion_p2p.worker.protocol import ROUNDS_DIR, round_files

log = logging.getLogger(__name__)

KEPT_STEPS = 1000
"""Describing a checkpoint forgets those of steps this many or more below it."""
MAX_PINS = 2
"""Checkpoints kept for downloads after the worker pruned them (the oldest read goes first)."""
PIN_IDLE = 600.0
"""Seconds a pin outlives its last read."""
PIN_DIR = re.compile(r"\.pinned-step-(\d{8})")


@dataclass
class Served:
    step: int
    folder: Path
    files: dict[str, tuple[int, str]]
    manifest_identity: tuple[int, int] = (0, 0)
    """The manifest's (inode, mtime_ns): a checkpoint replaced in place under the same step
    (a damaged one, or a stop checkpoint rewritten) is read again, not offered stale."""


def _identity(manifest: Path) -> tuple[int, int]:
    stat = manifest.stat()
    return stat.st_ino, stat.st_mtime_ns


class CheckpointCatalog:
    """The checkpoints under the folder ``root()`` names (None: none yet)."""

    def __init__(self, root: Callable[[], Path | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.clock = clock
        self._served: dict[int, Served] = {}
        self._pins: dict[int, float] = {}
        """Pinned step -> when it was last read."""
        self._swept_folders_at = -PIN_IDLE
        # Reads are answered on worker threads, several at once.
        self._lock = threading.Lock()

    def newest(self) -> Served | None:
        root = self.root()
        if root is None or not root.is_dir():
            return None
        found = sorted(int(m.group(1)) for p in root.iterdir()
                       if (m := STEP_DIR.fullmatch(p.name)))
        return self.at_step(found[-1]) if found else None

    def at_step(self, step: int) -> Served | None:
        root = self.root()
        if root is None or step < 0:
            return None
        folder = root / f"step-{step:08d}"
        if step in self._pins and not (folder / MANIFEST).exists():
            folder = self._pin_folder(step)
        cached = self._served.get(step)
        try:
            identity = _identity(folder / MANIFEST)
        except OSError:
            return None
        if cached is not None and cached.folder == folder and (
            cached.manifest_identity == identity
        ):
            return cached
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = {name: ((folder / name).stat().st_size, digest)
                     for name, digest in manifest["files"].items()}
            files[MANIFEST] = ((folder / MANIFEST).stat().st_size,
                               file_digest(folder / MANIFEST))
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        served = Served(step, folder, files, identity)
        self._served = {k: v for k, v in self._served.items() if k > step - KEPT_STEPS}
        self._served[step] = served
        return served

    def read(self, listing: Served, name: str, offset: int, length: int) -> bytes:
        self.pin(listing)
        try:
            f = (listing.folder / name).open("rb")
        except FileNotFoundError:
            # Pruned between the listing and this read: the pin holds the same file.
            f = self._pin_folder(listing.step).joinpath(name).open("rb")
        with f:
            f.seek(offset)
            return f.read(length)

    def _pin_folder(self, step: int) -> Path:
        root = self.root()
        assert root is not None
        return root / f".pinned-step-{step:08d}"

    def pin(self, listing: Served) -> None:
        """Keep ``listing``'s files readable after the worker prunes them (see the module's
        docstring). A file system without hard links serves the checkpoint unpinned."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            if listing.step in self._pins:
                self._pins[listing.step] = now
                return
            if listing.folder.name.startswith(".pinned"):
                return
            if len(self._pins) >= MAX_PINS:
                oldest = min(self._pins, key=self._pins.__getitem__)
                self._unpin(oldest)
            target = self._pin_folder(listing.step)
            try:
                target.mkdir(exist_ok=True)
                for name in listing.files:
                    if not (target / name).exists():
                        os.link(listing.folder / name, target / name)
            except OSError as exc:
                log.info("cannot pin the checkpoint of step %d: %s", listing.step, exc)
                shutil.rmtree(target, ignore_errors=True)
                return
            self._pins[listing.step] = now

    def _unpin(self, step: int) -> None:
        del self._pins[step]
        shutil.rmtree(self._pin_folder(step), ignore_errors=True)
        if (cached := self._served.get(step)) and cached.folder.name.startswith(".pinned"):
            del self._served[step]

    def _sweep(self, now: float) -> None:
        """Drop pins idle for ``PIN_IDLE``, and pin folders no pin of ours names (left by a
        daemon that stopped)."""
        for step in [s for s, last in self._pins.items() if now - last > PIN_IDLE]:
            self._unpin(step)
        root = self.root()
        if now - self._swept_folders_at < 60.0 or root is None or not root.is_dir():
            return
        self._swept_folders_at = now
        for path in root.iterdir():
            if (m := PIN_DIR.fullmatch(path.name)) and int(m.group(1)) not in self._pins:
                shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class ServedRound:
    round: int
    members: int
    size: int
    digest: str
    path: Path


class RoundCatalog:
    """The averaged rounds under ``root()/rounds``; each file's hash is computed once and kept
    while the file keeps its inode and modification time (the worker writes each round
    once, atomically)."""

    def __init__(self, root: Callable[[], Path | None]) -> None:
        self.root = root
        self._digests: dict[Path, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()

    def _files(self) -> dict[int, tuple[Path, int]]:
        root = self.root()
        if root is None:
            return {}
        found = round_files(root / ROUNDS_DIR)
        return {r: (path, members) for r, (path, members) in found.items() if members >= 2}

    def _describe(self, round_: int, path: Path, members: int) -> ServedRound | None:
        try:
            stat = path.stat()
            identity = (stat.st_ino, stat.st_mtime_ns)
            with self._lock:
                cached = self._digests.get(path)
            if cached is not None and cached[0] == identity:
                digest = cached[1]
            else:
                digest = file_digest(path)
                with self._lock:
                    self._digests = {p: v for p, v in self._digests.items() if p.exists()}
                    self._digests[path] = (identity, digest)
        except OSError:
            return None
        if stat.st_size == 0:
            return None
        return ServedRound(round_, members, stat.st_size, digest, path)

    def after(self, round_: int) -> list[ServedRound]:
        files = self._files()
        wanted = sorted(r for r in files if r > round_)[:MAX_ROUNDS]
        described = (self._describe(r, *files[r]) for r in wanted)
        return [d for d in described if d is not None]

    def at_round(self, round_: int) -> ServedRound | None:
        found = self._files().get(round_)
        return None if found is None else self._describe(round_, *found)

    def read(self, kept: ServedRound, offset: int, length: int) -> bytes:
        with kept.path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
