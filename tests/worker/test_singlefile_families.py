"""Single-file checkpoints of SD 2.x and SDXL load back with diffusers' ``from_single_file``
weight for weight, and the export writes them in the precision the run chooses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from dandelion_p2p.runconfig.schema import ModelConfig, from_dict
from dandelion_p2p.worker.export import export
from dandelion_p2p.worker.model import Components, load_components, select_trainable
from dandelion_p2p.worker.singlefile import save_single_file
from dandelion_p2p.worker.tiny import build_tiny_pipeline
from tests.worker.tiny_sdxl import build_sdxl_like


def modules(c: Components) -> dict[str, Any]:
    named = {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoders[0]}
    if c.is_sdxl:
        named["text_encoder_2"] = c.text_encoders[1]
    return named


def assert_same_weights(c: Components, loaded: Any, dtype: torch.dtype) -> None:
    for name, module in modules(c).items():
        original, back = module.state_dict(), getattr(loaded, name).state_dict()
        assert set(back) == set(original), name
        for key, value in original.items():
            assert torch.equal(back[key], value.to(dtype)), f"{name}.{key}"


def test_an_sd2_single_file_loads_back_with_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    base = build_tiny_pipeline(tmp_path / "sd2", "sd2")
    c = load_components(ModelConfig(base=str(base), family="sd2"))
    path = save_single_file(c, tmp_path / "sd2.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        keys = set(f.keys())
    # OpenCLIP's layout: q, k and v in one projection.
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.ln_final.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(base),
                                                      local_files_only=True)
    assert_same_weights(c, loaded, torch.float32)


def test_an_sdxl_single_file_loads_back_with_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    base = build_sdxl_like(tmp_path / "model")
    c = load_components(ModelConfig(base=str(base), family="sdxl"))
    path = save_single_file(c, tmp_path / "sdxl.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        keys = set(f.keys())
    for key in ("model.diffusion_model.label_emb.0.2.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"):
        assert key in keys, key
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(base),
                                                        local_files_only=True)
    assert_same_weights(c, loaded, torch.float32)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_a_full_export_writes_the_single_file_in_the_chosen_precision(
        tiny_sd1: Path, tmp_path: Path, precision: str) -> None:
    from diffusers import StableDiffusionPipeline

    config = from_dict({"name": "tiny", "model": {"base": str(tiny_sd1)},
                        "training": {"method": "full"}, "export": {"precision": precision}})
    c = load_components(config.model)
    select_trainable(c, config.training, 0)
    folder = export(c, config, tmp_path, 4, None)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    path = folder / "tiny-step-00000004.safetensors"
    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}  # noqa: SIM118
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd1),
                                                      local_files_only=True, torch_dtype=dtype)
    assert_same_weights(c, loaded, dtype)
    # The diffusers folder keeps the fp32 master weights whatever the single file holds.
    unet = StableDiffusionPipeline.from_pretrained(folder / "diffusers").unet
    assert unet.conv_in.weight.dtype == torch.float32
