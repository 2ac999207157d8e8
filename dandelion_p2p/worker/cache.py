"""Latents and text embeddings cached on disk, keyed by content.

A latent is keyed by the image bytes' hash, the bucket it was cropped for and a fingerprint of
the VAE; a text embedding by the caption and a fingerprint of the text encoders. Entries are
safetensors files written atomically, so a crash mid-write leaves no half entry, and a cache
shared by runs of one model (or restarted ones) is reused as is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def module_fingerprint(*modules: Any) -> str:
    """A cheap fingerprint of frozen modules: config and a checksum of every tensor."""
    h = blake3.blake3()
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            h.update(json.dumps(dict(config) if not hasattr(config, "to_dict")
                                else config.to_dict(), sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                h.update(name.encode())
                h.update(repr(float(tensor.double().sum())).encode())
    return h.hexdigest()[:32]


class TensorCache:
    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = Path(root) / fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        digest = blake3.blake3(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            log.warning("cache entry %s unreadable (%s); recomputing it", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write cache entry %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
