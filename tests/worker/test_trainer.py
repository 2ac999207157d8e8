"""The trainer on tiny random models, alone (no daemon): resume, LoRA, v-prediction, SDXL,
export, and clear errors for bad models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.link import SoloLink
from dandelion_p2p.worker.tiny import build_tiny_pipeline
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run


def solo(tmp_path: Path, config: RunConfig) -> SoloLink:
    path = tmp_path / f"{config.name}.toml"
    path.write_text(config.to_toml())
    return SoloLink(path)


def train(config: RunConfig, images: Path, work: Path, stop_at: int = 0,
          export: bool = False) -> Trainer:
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, stop_at=stop_at,
                                            export=export, gradient_checkpointing=True),
                      solo(work.parent, config))
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def sync_digests(work: Path) -> list[str]:
    lines = (work / "sync_log.jsonl").read_text().splitlines()
    return [json.loads(line)["digest"] for line in lines]


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_sd1: Path, images: Path,
                                                   tmp_path: Path) -> None:
    # Blocking rounds resume bit for bit; a stop with an overlapped round in flight applies
    # it early (test_overlap.py).
    config = tiny_run(tiny_sd1, training={"ema": True, "max_steps": 6},
                      sync={"overlap": False}, checkpoint={"every_steps": 2, "keep_last": 2})
    straight = train(config, images, tmp_path / "straight", export=True)
    train(config, images, tmp_path / "resumed", stop_at=3)
    resumed = train(config, images, tmp_path / "resumed", export=True)

    assert resumed.position.global_step == straight.position.global_step == 6
    for (name, a), (_, b) in zip(straight.c.trainable, resumed.c.trainable, strict=True):
        assert torch.equal(a, b), name
    assert sync_digests(tmp_path / "straight") == sync_digests(tmp_path / "resumed")
    steps = [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()]
    assert sorted(steps) == ["step-00000004", "step-00000006"], "keep_last = 2"
    ema_a = load_file(tmp_path / "straight/checkpoints/step-00000006/ema.safetensors")
    ema_b = load_file(tmp_path / "resumed/checkpoints/step-00000006/ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)

    exported = tmp_path / "resumed" / "export" / "tiny-step-00000006"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exported / "diffusers")
    unet_state = pipe.unet.state_dict()
    # The EMA: export.weights follows training.ema unless the run names the weights.
    for name, _ in resumed.c.trainable:
        assert torch.equal(unet_state[name.removeprefix("unet.")], ema_b[name])
    single = load_file(exported / "tiny-step-00000006.safetensors")
    assert "model.diffusion_model.input_blocks.0.0.weight" in single
    assert any(k.startswith("first_stage_model.") for k in single)
    assert any(k.startswith("cond_stage_model.transformer.") for k in single)


def test_lora_with_text_encoder_and_v_prediction_samples_and_exports(tiny_sd1: Path, images: Path,
                                                    tmp_path: Path) -> None:
    config = tiny_run(
        tiny_sd1,
        model={"base": str(tiny_sd1), "family": "sd2", "prediction": "v_prediction"},
        training={"method": "lora", "lora_rank": 4, "max_steps": 2, "sample_every": 2,
                  "train_text_encoder": True,
                  "sample_prompts": ["a red cat"], "sample_steps": 2, "noise_offset": 0.1},
        optimizer={"name": "adamw8bit", "lr": 1e-3},
        sync={"local_steps": 2},
    )
    trainer = train(config, images, tmp_path / "work", export=True)
    assert all("lora" in name for name, _ in trainer.c.trainable)
    assert any(name.startswith("text_encoder_0.") for name, _ in trainer.c.trainable)
    assert trainer.c.noise_scheduler.config.prediction_type == "v_prediction"
    assert (tmp_path / "work/samples/step-00000002-raw-00.png").is_file()
    lora = tmp_path / "work/export/tiny-step-00000002/pytorch_lora_weights.safetensors"
    exported = load_file(lora)
    assert any(k.startswith("unet.") for k in exported)
    assert any(k.startswith("text_encoder.") for k in exported)


def test_sdxl_trains_with_two_text_encoders(tmp_path: Path, images: Path) -> None:
    model = build_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    config = tiny_run(model, model={"base": str(model), "family": "sdxl"},
                      training={"max_steps": 1}, sync={"local_steps": 1})
    trainer = train(config, images, tmp_path / "work")
    assert trainer.c.is_sdxl and len(trainer.c.text_encoders) == 2
    assert trainer.position.global_step == 1


def test_a_missing_model_folder_is_named(tmp_path: Path, images: Path) -> None:
    config = tiny_run(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "w"), solo(tmp_path, config))


def test_an_unsupported_model_type_is_named(tmp_path: Path, images: Path) -> None:
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    config = tiny_run(folder)
    with pytest.raises(ConfigError, match="KandinskyPipeline"):
        Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "w"), solo(tmp_path, config))


def test_a_checkpoint_of_another_run_is_not_loaded(tiny_sd1: Path, images: Path,
                                                   tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 1}, sync={"local_steps": 1},
                      checkpoint={"every_steps": 1, "keep_last": 1})
    train(config, images, tmp_path / "work")
    other = replace(config, name="other")
    with pytest.raises(ConfigError, match="another run"):
        Trainer(other, WorkerOptions(data=images, work_dir=tmp_path / "work"),
                solo(tmp_path, other)).resume()


def test_smaller_forward_passes_learn_the_same(tiny_sd1: Path, images: Path,
                                              tmp_path: Path) -> None:
    # A large Adam eps keeps updates proportional to gradients (see the gradient-mode test).
    config = tiny_run(tiny_sd1, training={"max_steps": 2, "batch_size": 4},
                      optimizer={"name": "adamw", "lr": 2e-2, "eps": 0.1},
                      sync={"local_steps": 2})
    # On the CPU in fp32: under autocast a split batch rounds differently (test_gpu.py checks
    # the accumulation on CUDA in fp32).
    whole = Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "whole",
                                          export=False, device="cpu"),
                    solo(tmp_path, config))
    whole.resume()
    whole.run()
    whole.close()
    split = Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "split",
                                          micro_batch=1, export=False, device="cpu"),
                    solo(tmp_path, config))
    split.resume()
    split.run()
    split.close()
    for (name, a), (_, b) in zip(whole.c.trainable, split.c.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_an_exported_lora_loads_back_at_the_strength_it_trained_at(
    tiny_sd1: Path, images: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    # alpha / rank = 4: a loader that took alpha to be the rank would apply a quarter of it.
    config = tiny_run(tiny_sd1, training={"method": "lora", "lora_rank": 2, "lora_alpha": 8.0,
                                          "max_steps": 2},
                      optimizer={"name": "adamw", "lr": 1e-2}, sync={"local_steps": 2})
    trainer = train(config, images, tmp_path / "work", export=True)
    unet = trainer.c.unet.eval()
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    loaded.load_lora_weights(tmp_path / "work/export/tiny-step-00000002")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        ours = unet(latents, timestep, encoder_hidden_states=text).sample
        theirs = loaded.unet(latents, timestep, encoder_hidden_states=text).sample
        loaded.unet.disable_lora()
        base = loaded.unet(latents, timestep, encoder_hidden_states=text).sample
    assert float((ours - base).abs().max()) > 1e-4, "the LoRA changed nothing"
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
