"""Validation loss on held-out images, comparable across steps, runs and peers.

Which images are held out is decided by their content hash alone (``held_out``), so every
peer with the same data holds out the same ones and a restart holds out the same again. Each
validation image gets noise and a timestep fixed by its content hash (``VALIDATION_SEED``,
step 0), whatever the training step: two values differ only because the weights did.
``benchmarks/quality.py`` measures its checkpoints with the same ``validation_loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import blake3
import torch

from dandelion_p2p.worker import diffusion
from dandelion_p2p.worker.batches import BatchMaker
from dandelion_p2p.worker.bucketing import Bucket, nearest_bucket
from dandelion_p2p.worker.data import Sample
from dandelion_p2p.worker.model import Components

VALIDATION_SEED = 12345
"""Seeds every validation image's noise and timestep (never the training seed)."""
BATCH = 8
ValBatch = tuple[list[Sample], Bucket]


def held_out(content_hash: str, fraction: float) -> bool:
    """Whether the image with ``content_hash`` belongs to the validation split."""
    if fraction <= 0:
        return False
    digest = blake3.blake3(f"validation:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def split(samples: Sequence[Sample], entries: Sequence[int], fraction: float,
          max_images: int) -> tuple[list[int], list[Sample]]:
    """(the ``entries`` (indices into ``samples`` as an epoch draws them) left to train on,
    the held-out samples). At most ``max_images`` distinct images are validated (the first by
    hash); the rest of the held-out ones train neither."""
    keep: list[int] = []
    held: dict[str, Sample] = {}
    for i in entries:
        sample = samples[i]
        if held_out(sample.content_hash, fraction):
            held.setdefault(sample.content_hash, sample)
        else:
            keep.append(i)
    return keep, [held[h] for h in sorted(held)][:max_images]


def batches_of(samples: Sequence[Sample], buckets: Sequence[Bucket],
               size: int = BATCH) -> list[ValBatch]:
    """The held-out samples grouped by bucket, ``size`` at a time, in a fixed order."""
    groups: dict[Bucket, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.content_hash):
        groups.setdefault(nearest_bucket(sample.width, sample.height, buckets), []).append(
            sample)
    return [(group[i:i + size], bucket) for bucket, group in sorted(groups.items())
            for i in range(0, len(group), size)]


@torch.no_grad()
def validation_loss(c: Components, makers: BatchMaker, batches: Sequence[ValBatch],
                    autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                    ) -> float:
    """Mean per-image MSE of the model's prediction (no min-SNR weighting, no offset noise)
    over ``batches``, with each image's noise and timestep fixed by its content hash."""
    scheduler = c.noise_scheduler
    total, n = 0.0, 0
    for samples, bucket in batches:
        latents, size_cond = makers.latents(samples, bucket)
        noise, timesteps = diffusion.draw_noise(
            latents, VALIDATION_SEED, 0, [s.content_hash for s in samples],
            scheduler.config.num_train_timesteps, 0.0)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion.target_for(scheduler, latents, noise, timesteps, c.prediction)
        with (autocast or contextlib.nullcontext)():
            text = makers.text([s.caption for s in samples])
            prediction = c.unet(noisy, timesteps, **makers.unet_kwargs(text, size_cond)).sample
        total += float((prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).sum())
        n += len(samples)
    return total / max(1, n)
