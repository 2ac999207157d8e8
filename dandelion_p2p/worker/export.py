"""Exporting the trained model: a diffusers folder, and a single file for SD UIs.

Full fine-tunes export the whole pipeline as a diffusers folder (fp32) and one
``.safetensors`` file in the original Stable Diffusion layout of SD 1.x, 2.x or SDXL
(``singlefile``). LoRA runs export the formats ``export.lora_formats`` names:
``pytorch_lora_weights.safetensors`` (diffusers' format) and ``<run>-step-N.safetensors`` in
the kohya/A1111 layout (``kohya_lora``). ``export.precision`` sets the dtype of the single
file and of the LoRA files.

The weights written are those ``export.weights`` chooses: the EMA (swapped into the model for
the export only) or the raw trained weights; ``export.json`` beside them says which, and the
prediction type trained.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.ema import Ema, chosen_weights
from dandelion_p2p.worker.model import Components
from dandelion_p2p.worker.sampling import build_pipeline

log = logging.getLogger(__name__)


def export(c: Components, config: RunConfig, root: Path, step: int, ema: Ema | None) -> Path:
    """Write ``root/<run>-step-N/`` atomically (a temp folder renamed into place)."""
    final = root / f"{config.name}-step-{step:08d}"
    if final.exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = config.exported_weights()
    with chosen_weights(weights, ema):
        _write(c, config, tmp, step)
    # Nothing in the model files says which weights they hold or what they predict.
    (tmp / "export.json").write_text(json.dumps({
        "run": config.name, "step": step, "weights": weights, "method": config.training.method,
        "family": c.family, "prediction": c.prediction,
    }, indent=1) + "\n")
    os.rename(tmp, final)
    log.info("exported %s weights to %s", weights, final)
    return final


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_dtype(config: RunConfig, single_file: bool) -> torch.dtype:
    """The dtype ``export.precision`` gives the single file (or the LoRA files)."""
    precision = config.export.precision
    if precision == "auto":
        precision = "fp16" if single_file else "fp32"
    return PRECISIONS[precision]


def _write(c: Components, config: RunConfig, tmp: Path, step: int) -> None:
    if config.training.method == "lora":
        if "kohya" in config.export.lora_formats:
            from dandelion_p2p.worker.kohya_lora import save_kohya

            save_kohya(c, tmp / f"{config.name}-step-{step:08d}.safetensors",
                       save_dtype(config, False), config.training)
        if "diffusers" in config.export.lora_formats:
            _write_diffusers_lora(c, config, tmp)
    else:
        build_pipeline(c).save_pretrained(tmp / "diffusers")  # type: ignore[attr-defined]
        from dandelion_p2p.worker.singlefile import save_single_file

        save_single_file(c, tmp / f"{config.name}-step-{step:08d}.safetensors",
                         save_dtype(config, True))


def _write_diffusers_lora(c: Components, config: RunConfig, tmp: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    dtype = save_dtype(config, False)
    pipe = build_pipeline(c)
    layers = {"unet_lora_layers": get_peft_model_state_dict(c.unet)}
    if config.training.train_text_encoder:
        names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
        for name, encoder in zip(names, c.text_encoders, strict=False):
            layers[name] = get_peft_model_state_dict(encoder)
    layers = {name: {k: v.detach().to("cpu", dtype) for k, v in state.items()}
              for name, state in layers.items()}
    save = type(pipe).save_lora_weights  # type: ignore[attr-defined]
    accepted = inspect.signature(save).parameters
    metadata: dict[str, Any] = {}
    for name, module in zip(
        ["unet", "text_encoder", "text_encoder_2"],
        [c.unet, *(c.text_encoders if config.training.train_text_encoder else [])],
        strict=False,
    ):
        # Without the adapter's config beside the weights, loaders take lora_alpha to be
        # the rank and apply the LoRA at the wrong strength whenever the two differ.
        key = f"{name}_lora_adapter_metadata"
        if key in accepted:
            metadata[key] = module.peft_config["default"].to_dict()
    save(tmp, **layers, **metadata)
