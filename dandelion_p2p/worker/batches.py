"""From a planned batch (sample indices in one bucket) to model inputs: latents and text
embeddings, through the on-disk cache."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dandelion_p2p.worker.bucketing import Bucket
from dandelion_p2p.worker.cache import TensorCache, module_fingerprint
from dandelion_p2p.worker.data import Sample
from dandelion_p2p.worker.draws import Augmentation
from dandelion_p2p.worker.model import Components
from dandelion_p2p.worker.text_encoding import encode_prompts

log = logging.getLogger(__name__)

PLAIN = Augmentation()


def crop_to_bucket(image: Image.Image, bucket: Bucket,
                   augmentation: Augmentation = PLAIN) -> tuple[torch.Tensor, list[int]]:
    """Scale ``image`` to cover the bucket, crop it (centred, or where ``augmentation`` says)
    and flip it if asked; returns the pixels in [-1, 1] (C, H, W) and SDXL's size
    conditioning [orig_h, orig_w, crop_top, crop_left, h, w]."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    if augmentation.crop is not None:
        left = round((resized.width - width) * augmentation.crop[0])
        top = round((resized.height - height) * augmentation.crop[1])
    cropped = resized.crop((left, top, left + width, top + height))
    if augmentation.flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0)
    conditioning = [image.height, image.width, top, left, height, width]
    return pixels.permute(2, 0, 1).contiguous(), conditioning


class BatchMaker:
    """Model inputs for batches of samples. ``cache_latents``/``cache_text``: keep what was
    encoded on disk (off for leased chunks, which rarely come back to the same peer).
    ``clip_skip`` and ``chunks`` (of 75 tokens): how captions are encoded
    (``text_encoding.py``)."""

    def __init__(self, c: Components, cache_root: Path, device: torch.device,
                 cache_text: bool, cache_latents: bool = True, *, clip_skip: int = 1,
                 chunks: int = 1) -> None:
        self.c = c
        self.clip_skip = clip_skip
        self.chunks = chunks
        # Embeddings of the usual encoding keep their plain caption keys (caches written
        # before these settings stay valid); others are told apart by their settings.
        self.text_prefix = "" if (clip_skip, chunks) == (1, 1) else (
            f"clip_skip={clip_skip};chunks={chunks};")
        self.device = device
        self.cache_text = cache_text
        self.cache_latents = cache_latents
        self.latent_cache = TensorCache(cache_root / "latents", module_fingerprint(c.vae))
        self.text_cache = TensorCache(cache_root / "text", module_fingerprint(*c.text_encoders))
        self.scaling = float(c.vae.config.scaling_factor)

    @torch.no_grad()
    def latents(self, samples: Sequence[Sample], bucket: Bucket,
                augmentations: Sequence[Augmentation] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, 4, h/8, w/8) in fp32, size conditioning (B, 6)). A flipped image's
        latent is cached under a key of its own; a randomly cropped one is not cached."""
        out: list[torch.Tensor] = []
        conds: list[torch.Tensor] = []
        for i, sample in enumerate(samples):
            augmentation = augmentations[i] if augmentations is not None else PLAIN
            key = f"{sample.content_hash}:{bucket[0]}x{bucket[1]}"
            if augmentation.flip:
                key += ":flip"
            cache = self.cache_latents and augmentation.cacheable
            entry = self.latent_cache.get(key) if cache else None
            if entry is None:
                pixels, cond = crop_to_bucket(sample.load_image(), bucket, augmentation)
                vae_dtype = next(self.c.vae.parameters()).dtype
                dist = self.c.vae.encode(pixels[None].to(self.device, vae_dtype)).latent_dist
                # The mean, not a draw: a cached latent must not freeze one random sample.
                entry = {"latent": dist.mode()[0].float().cpu() * self.scaling,
                         "cond": torch.tensor(cond, dtype=torch.float32)}
                if cache:
                    self.latent_cache.put(key, entry)
            out.append(entry["latent"])
            conds.append(entry["cond"])
        return torch.stack(out).to(self.device), torch.stack(conds).to(self.device)

    def _encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.c.tokenizers, self.c.text_encoders, captions,
                              sdxl=self.c.is_sdxl, clip_skip=self.clip_skip,
                              chunks=self.chunks, device=self.device)

    def text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encoder hidden states (and SDXL's pooled embedding) for ``captions``."""
        if not self.cache_text:
            return self._encode(captions)
        parts: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for caption in captions:
                entry = self.text_cache.get(self.text_prefix + caption)
                if entry is None:
                    entry = {k: v[0].cpu() for k, v in self._encode([caption]).items()}
                    self.text_cache.put(self.text_prefix + caption, entry)
                parts.append(entry)
        return {k: torch.stack([p[k] for p in parts]).to(self.device) for k in parts[0]}

    def unet_kwargs(self, text: dict[str, Any], cond: torch.Tensor) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": text["hidden"]}
        if self.c.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": text["pooled"], "time_ids": cond}
        return kwargs
