"""Checkpoints: atomic, verified, the last N kept.

A checkpoint is a folder ``step-00000123`` holding safetensors files, ``torch.save`` blobs
and ``manifest.json`` (the training state and the blake3 hash of every file). It is written
as ``.tmp-step-...`` (each file fsynced), then renamed into place and the parent fsynced: a
crash at any point leaves either the whole new checkpoint or none, and the previous ones
untouched. Loading checks every hash and falls back to the next older checkpoint.

A save for a step that already has a folder replaces it, whether that folder verifies or not:
the caller's state is the current one (a damaged folder must not survive, and one that
verifies may hold an older state of that step, from before a catch-up or a restore). The old
folder is renamed to ``.replaced-step-...`` before the new one is renamed into place; a crash
between the two renames is undone at the next start, so a step never goes missing.

At start only our own unfinished ``.tmp-*`` folders are removed; nothing else is ever
deleted except checkpoints beyond ``keep_last`` and replaced ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dandelion_p2p.hashing import file_digest
from dandelion_p2p.worker.served_rounds import RoundArchive

log = logging.getLogger(__name__)

NAME = re.compile(r"step-(\d{8,})")
REPLACED = re.compile(r"\.replaced-(step-\d{8,})-\d+")
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def blob(self, name: str) -> Any:
        # Our own file, verified against the manifest's hash before this is called.
        return torch.load(self.path / f"{name}.pt", weights_only=False, map_location="cpu")

    def has(self, name: str) -> bool:
        return name in self.meta.get("files", {})


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, root: Path, keep_last: int, keep_rounds: int = 0) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rounds = RoundArchive(self.root, keep_rounds)
        """The averaged rounds kept beside the checkpoints for joiners."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._finish_replacements()
        for stale in self.root.glob(".tmp-step-*"):
            log.info("removing unfinished checkpoint %s", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _finish_replacements(self) -> None:
        """Complete replacements a crash interrupted: the old folder goes back in place if
        the new one never arrived, and is removed if it did."""
        for old in self.root.glob(".replaced-step-*"):
            m = REPLACED.fullmatch(old.name)
            if m is None:
                continue
            final = self.root / m.group(1)
            if not final.exists():
                # The old folder is moved aside only once the new one is written and fsynced:
                # a new folder that verifies is the state to keep.
                finished = [tmp for tmp in self.root.glob(f".tmp-{final.name}-*")
                            if self._verifies(tmp)]
                if finished:
                    log.info("finishing the replacement of %s", final.name)
                    os.rename(finished[0], final)
                else:
                    log.info("restoring %s: its replacement was not finished", final.name)
                    os.rename(old, final)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(self.root)

    def steps(self) -> list[Path]:
        """Finished checkpoint folders, oldest first."""
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := NAME.fullmatch(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest_step(self) -> int:
        """The newest finished checkpoint's step (not verified), or -1."""
        steps = self.steps()
        return int(NAME.fullmatch(steps[-1].name).group(1)) if steps else -1  # type: ignore[union-attr]

    def save(
        self,
        step: int,
        meta: dict[str, Any],
        tensors: dict[str, dict[str, torch.Tensor]],
        blobs: dict[str, Any],
    ) -> Path:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files: dict[str, str] = {}
        for name, group in tensors.items():
            path = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, path)
            files[path.name] = ""
        for name, blob in blobs.items():
            path = tmp / f"{name}.pt"
            torch.save(blob, path)
            files[path.name] = ""
        for file_name in files:
            _fsync_path(tmp / file_name)
            files[file_name] = file_digest(tmp / file_name)
        manifest = {"format": FORMAT, "step": step, "files": files, **meta}
        with (tmp / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if final.exists():
            self._replace(final, tmp)
        else:
            os.rename(tmp, final)
            _fsync_path(self.root)
        self._prune()
        return final

    def _replace(self, final: Path, new: Path) -> None:
        # The manifest alone says whether the old folder was whole enough to name: hashing a
        # full fine-tune's gigabytes here would only choose a log line, on the stop path.
        if (final / MANIFEST).is_file():
            log.info("replacing checkpoint %s with the current state of that step", final.name)
        else:
            log.warning("replacing a damaged checkpoint %s (no manifest)", final.name)
        old = self.root / f".replaced-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(new, final)
        _fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _verifies(self, path: Path) -> bool:
        try:
            self.verify(path)
        except ValueError:
            return False
        return True

    def _prune(self) -> None:
        steps = self.steps()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def verify(self, path: Path) -> Checkpoint:
        """Read and check one checkpoint; raises ValueError saying what is wrong."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: no readable manifest ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"{path}: the manifest lists no files")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: checkpoint format {manifest.get('format')!r}")
        if not isinstance(manifest.get("step"), int):
            raise ValueError(f"{path}: the manifest names no step")
        for file_name, digest in manifest["files"].items():
            file = path / file_name
            if not file.is_file() or file_digest(file) != digest:
                raise ValueError(f"{path}: {file_name} is missing or does not match its hash")
        return Checkpoint(path, int(manifest["step"]), manifest)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None."""
        for path in reversed(self.steps()):
            try:
                return self.verify(path)
            except ValueError as exc:
                log.warning("checkpoint unusable, trying an older one: %s", exc)
        return None
