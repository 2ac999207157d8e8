"""A tiny random SDXL pipeline shaped like the real one where export formats care: the two
text encoders of different widths (``from_single_file`` tells them apart by width), the last
up block without attention and the down blocks' attention from the second on."""

from __future__ import annotations

from pathlib import Path

import torch

from dandelion_p2p.worker.tiny import build_tiny_pipeline


def build_sdxl_like(folder: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    build_tiny_pipeline(folder / "base", "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / "base")
    torch.manual_seed(1)
    width = 48
    encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=86, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
        bos_token_id=84, eos_token_id=85, pad_token_id=85,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=pipe.text_encoder.config.hidden_size + width,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    pipe.register_modules(text_encoder_2=encoder, unet=unet)
    pipe.save_pretrained(folder / "sdxl")
    return folder / "sdxl"
