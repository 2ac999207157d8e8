"""Sample images from the run's fixed prompts, saved with the global step and the weights used
(``ema`` or ``raw``, as ``export.weights`` chooses) in the name and in the PNG's text."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.ema import Ema, chosen_weights
from dandelion_p2p.worker.model import Components
from dandelion_p2p.worker.protocol import sample_file_name
from dandelion_p2p.worker.text_encoding import pipeline_prompt


def build_pipeline(c: Components) -> object:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    # The trained scheduler's config, so sampling predicts what training taught (c.prediction).
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
                  device: torch.device, ema: Ema | None) -> list[Path]:
    """``folder/step-N-<weights>-I.png`` for every sample prompt I."""
    t = config.training
    weights = config.exported_weights()
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(c)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    was_training = c.unet.training
    c.unet.eval()
    paths = []
    try:
        with chosen_weights(weights, ema):
            for i, prompt in enumerate(t.sample_prompts):
                generator = torch.Generator().manual_seed(t.seed + i)
                with torch.autocast(device.type, enabled=False):
                    image = pipe(  # type: ignore[operator]
                        **pipeline_prompt(c, config.data, prompt, device),
                        num_inference_steps=t.sample_steps, generator=generator,
                        height=t.resolution, width=t.resolution,
                    ).images[0]
                info = PngInfo()
                for key, value in (("weights", weights), ("step", str(step)),
                                   ("prompt", prompt), ("run", config.name)):
                    info.add_text(key, value)
                path = folder / sample_file_name(step, weights, i)
                image.save(path, pnginfo=info)
                paths.append(path)
    finally:
        c.unet.train(was_training)
    return paths
