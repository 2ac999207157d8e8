"""LoRA as kohya sd-scripts and the A1111-style UIs use it: adapters on convolution and
feed-forward layers (LoCon), files in the kohya layout that diffusers' ``load_lora_weights``
reads and that change the image, and training that starts from a LoRA file of either layout."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig, from_dict
from dandelion_p2p.worker.export import export
from dandelion_p2p.worker.model import Components, load_components, select_trainable
from tests.worker.tiny_sdxl import build_sdxl_like


def lora_run(base: Path, family: str = "sd1", export_: dict[str, Any] | None = None,
             **training: Any) -> RunConfig:
    return from_dict({
        "name": "tiny", "model": {"base": str(base), "family": family},
        "training": {"method": "lora", "lora_rank": 2, "lora_alpha": 4.0, **training},
        "export": export_ or {},
    })


def adapted(config: RunConfig, seed: int = 0) -> Components:
    """Components with adapters whose up-projections are random, as training leaves them
    (peft starts them at zero, where a LoRA changes nothing)."""
    c = load_components(config.model)
    select_trainable(c, config.training, 0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in c.trainable:
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=generator)
    return c


def unet_inputs(unet: Any) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
            torch.randn(1, 16, unet.config.cross_attention_dim, generator=g),
            torch.randn(1, 32, generator=g), torch.randn(1, 6, generator=g))


@torch.no_grad()
def unet_out(unet: Any) -> torch.Tensor:
    latents, t, text, pooled, time_ids = unet_inputs(unet)
    extra = ({"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
             if unet.config.addition_embed_type == "text_time" else {})
    return unet.eval()(latents, t, encoder_hidden_states=text, **extra).sample


@torch.no_grad()
def text_out(encoder: Any) -> torch.Tensor:
    return encoder.eval()(torch.tensor([[84, 3, 4, 5, 85]])).last_hidden_state


def image(pipe: Any) -> np.ndarray:
    result = pipe("a red cat", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(result.images[0])


def header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def check_loaded(c: Components, pipe: Any, file: Path) -> None:
    """``file`` loaded into ``pipe`` changes the image, and the UNet and text encoders then
    compute what the trained ones do."""
    before = image(pipe)
    pipe.load_lora_weights(str(file))
    after = image(pipe)
    change = float(np.abs(after - before).mean())
    assert change > 0.01, f"the LoRA changed the image by {change}"
    ours, theirs = unet_out(c.unet), unet_out(pipe.unet)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    for mine, loaded in zip(c.text_encoders, encoders, strict=False):
        assert torch.allclose(text_out(mine), text_out(loaded), atol=1e-5)
    pipe.disable_lora()
    assert float((unet_out(pipe.unet) - ours).abs().max()) > 1e-3, "the LoRA changed nothing"


def test_a_kohya_locon_export_loads_in_diffusers_and_changes_the_image(
        tiny_sd1: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    config = lora_run(tiny_sd1, lora_layers="locon", lora_conv_rank=1, lora_conv_alpha=3.0,
                      train_text_encoder=True, export_={"lora_formats": ["kohya"]})
    c = adapted(config)
    folder = export(c, config, tmp_path, 3, None)
    file = folder / "tiny-step-00000003.safetensors"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [file.name]
    state, meta = header(file)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[conv + ".lora_down.weight"].shape[:2] == (1, 32)
    assert state[conv + ".lora_down.weight"].shape[2:] == (3, 3)
    assert float(state[conv + ".alpha"]) == 3.0
    ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    assert float(state[ff + ".alpha"]) == 4.0 and state[ff + ".lora_up.weight"].shape[1] == 2
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in state
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    check_loaded(c, pipe, file)


@pytest.mark.slow
def test_an_sdxl_kohya_export_names_layers_as_sd_scripts_and_loads(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    base = build_sdxl_like(tmp_path / "model")
    config = lora_run(base, "sdxl", lora_layers="locon", train_text_encoder=True)
    c = adapted(config)
    folder = export(c, config, tmp_path, 1, None)
    file = folder / "tiny-step-00000001.safetensors"
    state, meta = header(file)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in state  # an upsampler
    assert "lora_unet_middle_block_0_in_layers_2.alpha" in state  # a ResNet convolution
    assert any(k.startswith("lora_te1_text_model_") for k in state)
    assert any(k.startswith("lora_te2_text_model_") for k in state)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    check_loaded(c, pipe, file)


def test_training_starts_from_a_lora_file_of_either_layout(tiny_sd1: Path,
                                                           tmp_path: Path) -> None:
    source_config = lora_run(tiny_sd1, lora_layers="transformer", train_text_encoder=True)
    source = adapted(source_config)
    folder = export(source, source_config, tmp_path, 1, None)
    fresh = unet_out(load_components(source_config.model).unet)
    wanted = unet_out(source.unet)
    assert float((fresh - wanted).abs().max()) > 1e-3
    for name in ("tiny-step-00000001.safetensors", "pytorch_lora_weights.safetensors"):
        file = folder / name
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        # Another alpha than the file's: the adapters are rescaled so that they add what
        # the file's did.
        config = lora_run(tiny_sd1, lora_layers="transformer", lora_alpha=1.0,
                          train_text_encoder=True, lora_init=str(file), lora_init_sha256=digest)
        c = load_components(config.model)
        select_trainable(c, config.training, 1)
        assert torch.allclose(unet_out(c.unet), wanted, atol=1e-5), name
        assert torch.allclose(text_out(c.text_encoders[0]),
                              text_out(source.text_encoders[0]), atol=1e-5), name


def test_a_lora_file_that_does_not_fit_the_run_is_refused(tiny_sd1: Path,
                                                          tmp_path: Path) -> None:
    source_config = lora_run(tiny_sd1, lora_layers="locon")
    folder = export(adapted(source_config), source_config, tmp_path, 1, None)
    file = folder / "tiny-step-00000001.safetensors"

    def start(**training: Any) -> None:
        config = lora_run(tiny_sd1, lora_init=str(file), **training)
        select_trainable(load_components(config.model), config.training, 0)

    with pytest.raises(ConfigError, match="locon"):
        start()  # attention-only adapters: the file's convolutions have nowhere to go
    with pytest.raises(ConfigError, match="rank"):
        start(lora_layers="locon", lora_rank=4)
    with pytest.raises(ConfigError, match="SHA-256"):
        start(lora_layers="locon", lora_init_sha256="0" * 64)
    start(lora_layers="locon")


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_lora_files_are_saved_in_the_chosen_precision(tiny_sd1: Path, tmp_path: Path,
                                                      precision: str) -> None:
    config = lora_run(tiny_sd1, export_={"precision": precision})
    c = adapted(config)
    folder = export(c, config, tmp_path, 1, None)
    wanted = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    for name in ("tiny-step-00000001.safetensors", "pytorch_lora_weights.safetensors"):
        state, _ = header(folder / name)
        assert {t.dtype for t in state.values()} == {wanted}, name
    ours = dict(c.trainable)["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
                             ".to_q.lora_B.default.weight"]
    kohya, _ = header(folder / "tiny-step-00000001.safetensors")
    up = kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
               ".lora_up.weight"]
    assert torch.equal(up, ours.detach().to(wanted))


def test_a_locon_run_trains_on_from_a_kohya_file(tiny_sd1: Path, images: Path,
                                                 tmp_path: Path) -> None:
    from dandelion_p2p.worker.link import SoloLink
    from dandelion_p2p.worker.train import Trainer, WorkerOptions
    from tests.worker.runconfigs import tiny_run

    source_config = lora_run(tiny_sd1, lora_layers="locon", export_={"lora_formats": ["kohya"]})
    start = export(adapted(source_config), source_config, tmp_path / "start", 1, None)
    file = start / "tiny-step-00000001.safetensors"
    config = tiny_run(tiny_sd1, training={"method": "lora", "lora_rank": 2, "lora_alpha": 4.0,
                                          "lora_layers": "locon", "lora_init": str(file),
                                          "max_steps": 2},
                      sync={"local_steps": 2}, checkpoint={"every_steps": 2},
                      export={"lora_formats": ["kohya"]})
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "work",
                                            export=True, device="cpu"), SoloLink(toml))
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    before, _ = header(file)
    after, _ = header(tmp_path / "work/export/tiny-step-00000002/tiny-step-00000002.safetensors")
    assert set(after) == set(before)
    conv = "lora_unet_up_blocks_1_resnets_1_conv2.lora_up.weight"
    moved = float((after[conv] - before[conv]).abs().max())
    # Two steps at lr 1e-3 move the weights a little from where the file put them.
    assert 0 < moved < 0.05, moved
