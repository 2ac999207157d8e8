"""Exporting the trained model: a diffusers folder, and a single file for SD UIs.

Full fine-tunes export the whole pipeline as a diffusers folder and, for SD 1.x, one
``.safetensors`` file in the original Stable Diffusion layout (``singlefile``). LoRA runs
export ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format, read by diffusers and
the common UIs) and a folder with the base pipeline plus that file.

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


def _write(c: Components, config: RunConfig, tmp: Path, step: int) -> None:
    pipe = build_pipeline(c)
    if config.training.method == "lora":
        from peft.utils import get_peft_model_state_dict

        layers = {"unet_lora_layers": get_peft_model_state_dict(c.unet)}
        if config.training.train_text_encoder:
            names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
            for name, encoder in zip(names, c.text_encoders, strict=False):
                layers[name] = get_peft_model_state_dict(encoder)
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
    else:
        pipe.save_pretrained(tmp / "diffusers")  # type: ignore[attr-defined]
        if c.family == "sd1":
            from dandelion_p2p.worker.singlefile import save_single_file

            save_single_file(c, tmp / f"{config.name}-step-{step:08d}.safetensors")
