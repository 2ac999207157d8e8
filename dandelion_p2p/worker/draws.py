"""What one draw of an image trains: its caption as drawn, its augmentation (flip, crop
window) and its loss weight, by the settings of its subset (``kohya_dataset.py``).

Every choice comes from generators seeded by (run seed, global step, image hash): the same
on every peer, after a resume, and however a batch is split into forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.captions import CROP, FLIP, draw_generator, process_caption
from dandelion_p2p.worker.data import Sample
from dandelion_p2p.worker.kohya_dataset import subset_table


@dataclass(frozen=True, slots=True)
class Augmentation:
    flip: bool = False
    """Mirror left-right."""
    crop: tuple[float, float] | None = None
    """Where the crop window lies in the scaled image, as fractions (left, top) of the room
    it has; None: centred."""

    @property
    def cacheable(self) -> bool:
        """Whether the latent may be cached: a flipped image is one more fixed input (cached
        under its own key), a random crop window a new one at almost every draw."""
        return self.crop is None


class Draws:
    def __init__(self, config: RunConfig, subset_folders: Sequence[str]) -> None:
        self.folders = list(subset_folders)
        self.update(config)

    def update(self, config: RunConfig) -> None:
        """Take the settings of a new run config version (``caption_dropout`` is live)."""
        self.seed = config.training.seed
        self.table = subset_table(self.folders, config)

    @property
    def shapes_captions(self) -> bool:
        """Whether a caption can train as other text than written (shuffled, tags dropped):
        then the text embeddings are not cached (each draw would add an entry)."""
        return any(s.shuffle_caption or s.tag_dropout > 0 for s in self.table)

    def caption(self, sample: Sample, step: int) -> str:
        return process_caption(sample.caption, self.table[sample.subset], self.seed, step,
                               sample.content_hash)

    def augmentation(self, sample: Sample, step: int) -> Augmentation:
        settings = self.table[sample.subset]
        flip = bool(settings.flip and draw_generator(
            self.seed, step, sample.content_hash, FLIP).random() < 0.5)
        crop = None
        if settings.random_crop:
            left, top = draw_generator(self.seed, step, sample.content_hash, CROP).random(2)
            crop = (float(left), float(top))
        return Augmentation(flip, crop)

    def loss_weights(self, samples: Sequence[Sample], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.table[s.subset].loss_weight for s in samples],
                            dtype=torch.float32, device=device)
