"""LoRA files in the kohya sd-scripts / A1111 layout, written and read.

One LoRA module per adapted layer: ``<name>.lora_down.weight`` (A), ``<name>.lora_up.weight``
(B) and ``<name>.alpha`` (a scalar; the loaders scale B·A by alpha / rank), where ``<name>``
is the layer's path with ``_`` for ``.`` behind ``lora_unet_``, ``lora_te_`` (SD 1.x/2.x) or
``lora_te1_`` / ``lora_te2_`` (SDXL). SD 1.x and 2.x UNets use diffusers' layer names, as
sd-scripts does; SDXL UNets use the original (SGM) names (``input_blocks_4_1_...``), as
sd-scripts writes them for SDXL. Convolution adapters (LoCon) keep their kernel in
``lora_down`` and a 1x1 ``lora_up``, the shapes peft uses too.

Reading accepts the same layout, with SDXL UNet layers named either way, and diffusers' own
LoRA files (``unet.<layer>.lora_A.weight``, scaled by the adapter config saved with them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import TrainingConfig
from dandelion_p2p.worker.model import Components
from dandelion_p2p.worker.singlefile import convert_unet

ADAPTER = "default"
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def lora_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """(layer path, peft LoRA layer) for every adapted layer of ``module``."""
    from peft.tuners.lora import LoraLayer

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and ADAPTER in sub.lora_A:
            yield name, sub


def _text_path(name: str) -> str:
    # transformers 5 dropped the ``text_model.`` level of CLIPTextModel; the kohya names
    # (from transformers 4) keep it.
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def _sgm_path(name: str, config: Any) -> str:
    key = next(iter(convert_unet({name + ".weight": torch.empty(0)}, config)))
    return key.removeprefix("model.diffusion_model.").removesuffix(".weight")


def parts(c: Components) -> list[tuple[str, nn.Module]]:
    """(kohya prefix, module) for the UNet and every text encoder."""
    te = ["lora_te1_", "lora_te2_"] if c.is_sdxl else ["lora_te_"]
    return [("lora_unet_", c.unet), *zip(te, c.text_encoders, strict=False)]


def kohya_names(c: Components, prefix: str, name: str) -> list[str]:
    """The kohya names of layer ``name`` under ``prefix``, the one written first."""
    if prefix != "lora_unet_":
        return [prefix + _text_path(name).replace(".", "_")]
    plain = prefix + name.replace(".", "_")
    if c.is_sdxl:
        return [prefix + _sgm_path(name, c.unet.config).replace(".", "_"), plain]
    return [plain]


def to_kohya(c: Components, dtype: torch.dtype, text: bool) -> dict[str, torch.Tensor]:
    """The adapters of ``c`` (the text encoders' too when ``text``) as a kohya state dict."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in parts(c):
        if prefix != "lora_unet_" and not text:
            continue
        for name, layer in lora_layers(module):
            key = kohya_names(c, prefix, name)[0]
            down = layer.lora_A[ADAPTER].weight
            out[key + ".lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
            out[key + ".lora_up.weight"] = (
                layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous())
            # alpha = scaling * rank, so alpha patterns (a LoCon conv alpha) come out right.
            alpha = float(layer.scaling[ADAPTER]) * down.shape[0]
            out[key + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def kohya_metadata(c: Components, training: TrainingConfig) -> dict[str, str]:
    """The ``ss_*`` header fields the UIs show and the SD version they pick networks by."""
    args: dict[str, str] = {}
    if training.lora_layers == "locon":
        args = {"conv_dim": str(training.lora_conv_rank or training.lora_rank),
                "conv_alpha": str(training.lora_conv_alpha or training.lora_alpha)}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(training.lora_rank),
        "ss_network_alpha": str(training.lora_alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_VERSIONS[c.family],
        "ss_v2": str(c.family == "sd2"),
        "ss_v_parameterization": str(c.prediction == "v_prediction"),
    }


def save_kohya(c: Components, path: Path, dtype: torch.dtype,
               training: TrainingConfig) -> Path:
    state = to_kohya(c, dtype, training.train_text_encoder)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", **kohya_metadata(c, training)})
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------ reading


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() != ".safetensors":
        # A pickled file runs code of its author's choosing when loaded.
        raise ConfigError(f"{path}: a LoRA to start from must be a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            return tensors, dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: unreadable LoRA file ({exc})") from None


def _layer_table(c: Components, kohya: bool) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for (prefix, module), part in zip(parts(c), ["unet", "text_encoder", "text_encoder_2"],
                                      strict=False):
        for name, layer in lora_layers(module):
            if kohya:
                for key in kohya_names(c, prefix, name):
                    table[key] = layer
            else:
                table[f"{part}.{name}"] = layer
                if part != "unet":
                    table[f"{part}.{_text_path(name)}"] = layer
    return table


def _diffusers_scales(metadata: dict[str, str]) -> dict[str, Any]:
    """Each part's saved adapter config (alpha, rank and their per-layer patterns)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        part, _, field = key.partition(".")
        out.setdefault(part, {})[field] = value
    return out


def _file_scale(config: dict[str, Any], name: str, rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = float(value)
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def load_lora_file(c: Components, path: Path) -> int:
    """Copy the adapters of LoRA file ``path`` (kohya or diffusers layout) into the adapters
    of ``c``, rescaled to their alpha; returns how many layers were set.

    Raises:
        ConfigError: the file is unreadable, or holds a layer this run does not adapt, or one
            of another rank than the run's.
    """
    state, metadata = _read(path)
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in state)
    table = _layer_table(c, kohya)
    scales = {} if kohya else _diffusers_scales(metadata)
    down_suffix, up_suffix = ((".lora_down.weight", ".lora_up.weight") if kohya
                              else (".lora_A.weight", ".lora_B.weight"))
    names = sorted(k.removesuffix(down_suffix) for k in state if k.endswith(down_suffix))
    if not names:
        raise ConfigError(f"{path}: no LoRA weights in the kohya or diffusers layout")
    missing = [n for n in names if n not in table]
    if missing:
        raise ConfigError(
            f"{path}: {len(missing)} adapted layers this run does not adapt (first: "
            f"{missing[0]}); with text encoder layers set training.train_text_encoder = true, "
            'with convolution or feed-forward layers training.lora_layers = "locon"'
        )
    done = set()
    with torch.no_grad():
        for name in names:
            layer = table[name]
            down, up = state[name + down_suffix], state.get(name + up_suffix)
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if up is None or down.shape != a.shape or up.shape != b.shape:
                raise ConfigError(
                    f"{path}: layer {name} has rank {down.shape[0]} ({tuple(down.shape)}), this "
                    f"run {a.shape[0]} ({tuple(a.shape)}); set the run's LoRA rank to the file's"
                )
            rank = down.shape[0]
            if kohya:
                alpha = state.get(name + ".alpha")
                theirs = float(alpha) / rank if alpha is not None else 1.0
            else:
                part, _, layer_name = name.partition(".")
                theirs = _file_scale(scales.get(part, {}), layer_name, rank)
            ours = float(layer.scaling[ADAPTER])
            a.copy_(down.to(a.dtype))
            # B·A·scale is what the layer adds: B takes up the difference in scale.
            b.copy_((up.double() * (theirs / ours)).to(b.dtype))
            done.add(id(layer))
    return len(done)


def start_from(c: Components, file: str, sha256: str) -> None:
    """Start the adapters of ``c`` from LoRA file ``file`` (``training.lora_init``).

    Raises:
        ConfigError: the file is missing, unreadable, not the one ``sha256`` names, or does
            not fit the run's adapters.
    """
    import hashlib
    import logging

    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"training.lora_init: {path} does not exist")
    if sha256:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise ConfigError(f"training.lora_init: {path} is not the file the run names "
                              f"(SHA-256 {digest.hexdigest()}, the run says {sha256})")
    count = load_lora_file(c, path)
    logging.getLogger(__name__).info("LoRA adapters of %d layers start from %s", count, path)
