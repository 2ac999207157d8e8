"""A caption as one draw trains it: caption dropout, then kohya's tag handling.

The caption is split into tags at commas. The first ``keep_tokens`` tags stay in front, as
written; the rest are shuffled (``shuffle_caption``) and each is left out with chance
``tag_dropout``; the tags are joined again with ", ". A caption dropped whole
(``caption_dropout``) trains as the empty prompt. Every choice comes from a generator seeded
by (run seed, global step, image hash), so a draw is the same on every peer and after a
resume, and does not depend on how a batch is split.
"""

from __future__ import annotations

import blake3
import numpy as np

from dandelion_p2p.worker.diffusion import sample_generator
from dandelion_p2p.worker.kohya_dataset import SubsetSettings

SEPARATOR = ","
TAGS, FLIP, CROP = 1, 2, 3
"""Purposes of ``draw_generator``: each kind of draw has its own stream."""


def draw_generator(seed: int, step: int, content_hash: str, purpose: int) -> np.random.Generator:
    """The generator of one kind of random choice for one image at one global step."""
    digest = int(blake3.blake3(content_hash.encode()).hexdigest()[:16], 16)
    return np.random.default_rng([seed, step, digest, purpose])


def dropped(rate: float, seed: int, step: int, content_hash: str) -> bool:
    """Whether the caption is dropped at this draw (the choice the trainer made before
    subsets existed, so a run keeps its draws)."""
    if not rate:
        return False
    return sample_generator(seed + 1, step, content_hash).initial_seed() % 10_000 < rate * 10_000


def shapes_caption(settings: SubsetSettings) -> bool:
    """Whether a caption can train as other text than written (no caching it then)."""
    return settings.shuffle_caption or settings.tag_dropout > 0


def process_caption(caption: str, settings: SubsetSettings, seed: int, step: int,
                    content_hash: str) -> str:
    if dropped(settings.caption_dropout, seed, step, content_hash):
        return ""
    if not shapes_caption(settings):
        return caption
    rng = draw_generator(seed, step, content_hash, TAGS)
    tags = [t.strip() for t in caption.split(SEPARATOR)]
    tags = [t for t in tags if t]
    fixed, flexible = tags[:settings.keep_tokens], tags[settings.keep_tokens:]
    if settings.shuffle_caption:
        flexible = [flexible[int(i)] for i in rng.permutation(len(flexible))]
    if settings.tag_dropout:
        keep = rng.random(len(flexible)) >= settings.tag_dropout
        flexible = [t for t, k in zip(flexible, keep, strict=True) if k]
    return ", ".join(fixed + flexible)
