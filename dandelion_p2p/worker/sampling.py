"""Sample images from the run's fixed prompts, saved with the global step in the name."""

from __future__ import annotations

from pathlib import Path

import torch

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.model import Components


def build_pipeline(c: Components) -> object:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(c.noise_scheduler.config)
    if c.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_images(c: Components, config: RunConfig, folder: Path, step: int,
                  device: torch.device) -> list[Path]:
    t = config.training
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(c)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    was_training = c.unet.training
    c.unet.eval()
    paths = []
    try:
        for i, prompt in enumerate(t.sample_prompts):
            generator = torch.Generator().manual_seed(t.seed + i)
            with torch.autocast(device.type, enabled=False):
                image = pipe(  # type: ignore[operator]
                    prompt, num_inference_steps=t.sample_steps, generator=generator,
                    height=t.resolution, width=t.resolution,
                ).images[0]
            path = folder / f"step-{step:08d}-{i:02d}.png"
            image.save(path)
            paths.append(path)
    finally:
        c.unet.train(was_training)
    return paths
