"""Export and sample images use the weights ``export.weights`` chooses: the EMA or the raw
trained weights; the trained weights are back in place afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.ema import Ema
from dandelion_p2p.worker.link import SoloLink
from dandelion_p2p.worker.model import load_components, select_trainable
from dandelion_p2p.worker.sampling import sample_images
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run

SAMPLING = {"sample_every": 2, "sample_prompts": ["a red cat"], "sample_steps": 2}


def train(config: RunConfig, images: Path, work: Path) -> Trainer:
    toml = work.parent / f"{work.name}.toml"
    toml.write_text(config.to_toml())
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, export=True,
                                            device="cpu"), SoloLink(toml))
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def test_an_ema_run_exports_and_samples_its_ema_weights(tiny_sd1: Path, images: Path,
                                                        tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"ema": True, "ema_decay": 0.5, "max_steps": 2,
                                          **SAMPLING},
                      sync={"local_steps": 2}, checkpoint={"every_steps": 2})
    trainer = train(config, images, tmp_path / "work")
    final = tmp_path / "work/checkpoints/step-00000002"
    ema, raw = load_file(final / "ema.safetensors"), load_file(final / "trainable.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "the EMA lags the weights"

    from diffusers import StableDiffusionPipeline

    exported = tmp_path / "work/export/tiny-step-00000002"
    unet = StableDiffusionPipeline.from_pretrained(exported / "diffusers").unet.state_dict()
    for name in ema:
        assert torch.equal(unet[name.removeprefix("unet.")], ema[name]), name
    single = load_file(exported / "tiny-step-00000002.safetensors")
    assert torch.equal(single["model.diffusion_model.out.2.bias"],
                       ema["unet.conv_out.bias"].half())
    for name, param in trainer.c.trainable:
        assert torch.equal(param.detach(), raw[name]), f"{name}: raw weights restored"
    about = json.loads((exported / "export.json").read_text())
    assert about["weights"] == "ema" and about["prediction"] == "epsilon"

    sample = tmp_path / "work/samples/step-00000002-ema-00.png"
    assert Image.open(sample).text["weights"] == "ema"  # type: ignore[attr-defined]


def test_raw_weights_are_exported_when_the_run_says_so(tiny_sd1: Path, images: Path,
                                                       tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"ema": True, "ema_decay": 0.5, "max_steps": 2},
                      sync={"local_steps": 2}, checkpoint={"every_steps": 2},
                      export={"weights": "raw"})
    train(config, images, tmp_path / "work")
    raw = load_file(tmp_path / "work/checkpoints/step-00000002/trainable.safetensors")
    single = load_file(tmp_path / "work/export/tiny-step-00000002/tiny-step-00000002.safetensors")
    assert torch.equal(single["model.diffusion_model.out.2.bias"],
                       raw["unet.conv_out.bias"].half())


def test_samples_from_the_ema_are_those_of_the_ema_weights(tiny_sd1: Path,
                                                          tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"ema": True, **SAMPLING})
    c = load_components(config.model)
    select_trainable(c, config.training, seed=0)
    ema = Ema(c.trainable, decay=0.5)
    with torch.no_grad():
        for _, param in c.trainable:
            param.add_(torch.randn_like(param), alpha=0.5)
    raw_weights = [param.detach().clone() for _, param in c.trainable]
    cpu = torch.device("cpu")

    [from_ema] = sample_images(c, config, tmp_path / "ema", 2, cpu, ema)
    for (name, param), before in zip(c.trainable, raw_weights, strict=True):
        assert torch.equal(param.detach(), before), f"{name}: raw weights restored"
    raw_config = tiny_run(tiny_sd1, training={"ema": True, **SAMPLING},
                          export={"weights": "raw"})
    [from_raw] = sample_images(c, raw_config, tmp_path / "raw", 2, cpu, ema)
    with torch.no_grad():
        for (_, param), shadow in zip(c.trainable, ema.shadow, strict=True):
            param.copy_(shadow)
    [ema_as_raw] = sample_images(c, raw_config, tmp_path / "copied", 2, cpu, ema)

    assert from_ema.name == "step-00000002-ema-00.png"
    assert from_raw.name == ema_as_raw.name == "step-00000002-raw-00.png"
    pixels = {p: np.asarray(Image.open(p)) for p in (from_ema, from_raw, ema_as_raw)}
    assert np.array_equal(pixels[from_ema], pixels[ema_as_raw])
    assert not np.array_equal(pixels[from_ema], pixels[from_raw])
