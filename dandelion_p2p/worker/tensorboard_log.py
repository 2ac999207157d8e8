"""TensorBoard event files in the work folder: ``tensorboard --logdir WORK_DIR/tensorboard``.

Every value is written at the swarm's global step, so curves from a restart continue where
the checkpoint left off (TensorBoard shows the newest event of a step). Written through
``torch.utils.tensorboard``, which needs the ``tensorboard`` package; without it the worker
trains on and says once that it writes no event files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

TAGS = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "samples_per_second": "train/samples_per_second",
    "validation_loss": "validation/loss",
    "round_seconds": "swarm/round_seconds",
    "fraction_averaged": "swarm/fraction_averaged",
    "round_peers": "swarm/round_peers",
    "sync_wait_seconds": "swarm/sync_wait_seconds",
}


class TensorBoardLog:
    """Scalars by the names in ``TAGS`` and sample images, under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log.info("no TensorBoard event files: %s (install the tensorboard package)", exc)
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(folder), flush_secs=10)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(TAGS.get(name, name), float(value), step)

    def images(self, step: int, paths: Sequence[Path]) -> None:
        """The sample images of ``step``, one tag per prompt index."""
        if self._writer is None:
            return
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._writer.add_image(f"samples/{i:02d}", pixels, step, dataformats="HWC")
        self._writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
