"""Tiny random Stable Diffusion pipelines built from configs, for tests and `make demo`:
nothing is downloaded, and a CPU trains them in seconds."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CROSS_DIM = 32


def write_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A character-level CLIP tokenizer: every letter and digit is a token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    raw = folder / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(
        raw, model_max_length=max_length, pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)


def _text_encoder(projection: bool, vocab_size: int, max_length: int):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CROSS_DIM if not projection else 32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def build_tiny_pipeline(folder: Path, family: str = "sd1", seed: int = 0,
                        unet_widths: tuple[int, int] = (32, 64)) -> Path:
    """Write a tiny random diffusers pipeline of ``family`` (sd1, sd2 or sdxl) to ``folder``;
    ``unet_widths``: the channels of the UNet's two levels (multiples of 32)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    max_length = 16
    write_tokenizer(folder / "tokenizer", max_length)
    vocab_size = 86
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
        # What current diffusers expects of SD schedulers (it warns about older configs).
        steps_offset=1,
        clip_sample=False,
    )
    unet_args: dict[str, object] = dict(
        block_out_channels=unet_widths,
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    text_encoder = _text_encoder(False, vocab_size, max_length)
    if family == "sdxl":
        unet_args.update(
            cross_attention_dim=CROSS_DIM + 32,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            transformer_layers_per_block=(1, 1),
        )
        unet = UNet2DConditionModel(**unet_args)  # type: ignore[arg-type]
        write_tokenizer(folder / "tokenizer_2", max_length)
        pipe: Any = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=_text_encoder(True, vocab_size, max_length),
            tokenizer=_load_tokenizer(folder / "tokenizer"),
            tokenizer_2=_load_tokenizer(folder / "tokenizer_2"),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        unet = UNet2DConditionModel(**unet_args)  # type: ignore[arg-type]
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=_load_tokenizer(folder / "tokenizer"),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder)
    return folder


def _load_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def write_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), seed: int = 0,
                 captions: bool = True, compress_level: int = 6) -> list[Path]:
    """``count`` images with simple structure (coloured gradients) and a caption beside each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "cat", "dog", "tree", "sky", "sea"]
    paths = []
    for i in range(count):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        colour = rng.uniform(0, 255, 3)
        image = np.stack([(xx / w) * colour[0], (yy / h) * colour[1],
                          np.full_like(xx, colour[2])], axis=-1).astype(np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(image).save(path, compress_level=compress_level)
        if captions:
            path.with_suffix(".txt").write_text(" ".join(rng.choice(words, 3)))
        paths.append(path)
    return paths
