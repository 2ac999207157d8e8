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
from dandelion_p2p.worker.model import Components

log = logging.getLogger(__name__)


def crop_to_bucket(image: Image.Image, bucket: Bucket) -> tuple[torch.Tensor, list[int]]:
    """Scale ``image`` to cover the bucket, centre-crop it; returns the pixels in [-1, 1]
    (C, H, W) and SDXL's size conditioning [orig_h, orig_w, crop_top, crop_left, h, w]."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0)
    conditioning = [image.height, image.width, top, left, height, width]
    return pixels.permute(2, 0, 1).contiguous(), conditioning


class BatchMaker:
    """Model inputs for batches of samples. ``cache_latents``/``cache_text``: keep what was
    encoded on disk (off for leased chunks, which rarely come back to the same peer)."""

    def __init__(self, c: Components, cache_root: Path, device: torch.device,
                 cache_text: bool, cache_latents: bool = True) -> None:
        self.c = c
        self.device = device
        self.cache_text = cache_text
        self.cache_latents = cache_latents
        self.latent_cache = TensorCache(cache_root / "latents", module_fingerprint(c.vae))
        self.text_cache = TensorCache(cache_root / "text", module_fingerprint(*c.text_encoders))
        self.scaling = float(c.vae.config.scaling_factor)

    @torch.no_grad()
    def latents(self, samples: Sequence[Sample],
                bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, 4, h/8, w/8) in fp32, size conditioning (B, 6))."""
        out: list[torch.Tensor] = []
        conds: list[torch.Tensor] = []
        for sample in samples:
            key = f"{sample.content_hash}:{bucket[0]}x{bucket[1]}"
            entry = self.latent_cache.get(key) if self.cache_latents else None
            if entry is None:
                pixels, cond = crop_to_bucket(sample.load_image(), bucket)
                vae_dtype = next(self.c.vae.parameters()).dtype
                dist = self.c.vae.encode(pixels[None].to(self.device, vae_dtype)).latent_dist
                # The mean, not a draw: a cached latent must not freeze one random sample.
                entry = {"latent": dist.mode()[0].float().cpu() * self.scaling,
                         "cond": torch.tensor(cond, dtype=torch.float32)}
                if self.cache_latents:
                    self.latent_cache.put(key, entry)
            out.append(entry["latent"])
            conds.append(entry["cond"])
        return torch.stack(out).to(self.device), torch.stack(conds).to(self.device)

    def _encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for tokenizer, encoder in zip(self.c.tokenizers, self.c.text_encoders, strict=True):
            ids = tokenizer(list(captions), padding="max_length",
                            max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            if self.c.is_sdxl:
                output = encoder(ids, output_hidden_states=True)
                hidden.append(output.hidden_states[-2])
                pooled = output[0]
            else:
                hidden.append(encoder(ids)[0])
        result = {"hidden": torch.cat(hidden, dim=-1).float()}
        if pooled is not None:
            result["pooled"] = pooled.float()
        return result

    def text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encoder hidden states (and SDXL's pooled embedding) for ``captions``."""
        if not self.cache_text:
            return self._encode(captions)
        parts: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for caption in captions:
                entry = self.text_cache.get(caption)
                if entry is None:
                    entry = {k: v[0].cpu() for k, v in self._encode([caption]).items()}
                    self.text_cache.put(caption, entry)
                parts.append(entry)
        return {k: torch.stack([p[k] for p in parts]).to(self.device) for k in parts[0]}

    def unet_kwargs(self, text: dict[str, Any], cond: torch.Tensor) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": text["hidden"]}
        if self.c.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": text["pooled"], "time_ids": cond}
        return kwargs
