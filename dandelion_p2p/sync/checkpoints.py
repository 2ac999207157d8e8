"""The checkpoints a daemon serves to joining peers, read from its worker's folder.

Each ``step-NNNNNNNN/`` folder the worker wrote is described once (its files' sizes, the
digests its ``manifest.json`` records, the manifest's own digest) and the description kept
while the manifest keeps its inode and modification time. Only the files a manifest lists,
and the manifest, are ever opened. Local files only: no network here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dandelion_p2p.hashing import file_digest
from dandelion_p2p.sync.statesync_core import MANIFEST, STEP_DIR

KEPT_STEPS = 1000
"""Describing a checkpoint forgets those of steps this many or more below it."""


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

    def __init__(self, root: Callable[[], Path | None]) -> None:
        self.root = root
        self._served: dict[int, Served] = {}

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
        with (listing.folder / name).open("rb") as f:
            f.seek(offset)
            return f.read(length)
