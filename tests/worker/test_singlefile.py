"""Single-file export uses the original Stable Diffusion key names."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from dandelion_p2p.runconfig.schema import ModelConfig
from dandelion_p2p.worker.model import load_components
from dandelion_p2p.worker.singlefile import convert_unet, convert_vae, save_single_file

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    layers_per_block=2,
    attention_head_dim=8,
)


def test_sd15_unet_and_vae_keys_match_the_original_layout() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)  # type: ignore[arg-type]
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
    keys = set(convert_unet(unet.state_dict(), unet.config))
    assert len(keys) == len(unet.state_dict()) == 686
    prefix = "model.diffusion_model."
    for key in (
        "time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight", "input_blocks.11.0.emb_layers.1.weight",
        "middle_block.1.proj_in.weight", "middle_block.2.out_layers.3.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "out.2.bias",
    ):
        assert prefix + key in keys, key
    vae_state = vae.state_dict()
    converted = convert_vae(vae_state, vae.config)
    assert len(converted) == len(vae_state)
    for key in ("encoder.down.0.block.1.conv1.weight", "encoder.down.3.block.0.norm1.bias",
                "encoder.down.1.downsample.conv.weight", "decoder.up.3.block.2.conv2.weight",
                "decoder.up.1.upsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.mid.attn_1.q.weight", "decoder.mid.block_2.conv1.weight",
                "encoder.norm_out.weight", "post_quant_conv.weight"):
        assert "first_stage_model." + key in converted, key
    assert converted["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_the_single_file_loads_back_with_diffusers(tiny_sd1: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    components = load_components(ModelConfig(base=str(tiny_sd1)))
    path = save_single_file(components, tmp_path / "tiny.safetensors", dtype=torch.float32)
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_sd1), local_files_only=True
    )
    for name, module in (("unet", components.unet), ("vae", components.vae),
                         ("text_encoder", components.text_encoders[0])):
        original = module.state_dict()
        back = getattr(loaded, name).state_dict()
        assert set(back) == set(original), name
        assert all(torch.equal(back[k], original[k]) for k in original), name
