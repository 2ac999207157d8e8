"""Loading a Stable Diffusion model for training, and choosing what trains.

A model comes from a local diffusers folder, a single-file checkpoint (``.safetensors`` or
``.ckpt``, through diffusers' ``from_single_file``) or, when the user names one, a hub id.
SD 1.x and 2.x share one layout (2.x 768 models predict v); SDXL adds a second text encoder
and size/crop conditioning.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import ModelConfig, TrainingConfig

log = logging.getLogger(__name__)

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": ("sd1", "sd2"),
    "StableDiffusionXLPipeline": ("sdxl",),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MLP_TARGETS = ["fc1", "fc2"]


@dataclass
class Components:
    family: str
    prediction: str
    unet: Any
    vae: Any
    noise_scheduler: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    source: str
    trainable: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    """Every parameter that trains, by a stable name: what checkpoints hold and peers sync."""

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


def _looks_local(base: str) -> bool:
    return base.startswith(("/", ".", "~")) or Path(base).suffix in SINGLE_FILE_SUFFIXES


def _check_folder(folder: Path, family: str) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"{folder} is not a diffusers model folder (no model_index.json); give a diffusers "
            "folder, a .safetensors/.ckpt checkpoint or a hub id"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{index}: unreadable ({exc})") from None
    families = PIPELINE_FAMILIES.get(class_name)
    if families is None:
        raise ConfigError(
            f"{folder} holds a {class_name or 'unknown'} model; supported: "
            + ", ".join(PIPELINE_FAMILIES)
        )
    if family not in families:
        raise ConfigError(
            f"{folder} holds a {class_name} but the run config says model.family = {family!r}"
        )


def _pipeline_class(family: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def load_pipeline(model: ModelConfig) -> Any:
    """The whole pipeline on the CPU.

    Raises:
        ConfigError: the model is missing, of an unsupported type, or cannot be read.
    """
    base = model.base
    path = Path(base).expanduser()
    cls = _pipeline_class(model.family)
    try:
        if path.is_dir():
            _check_folder(path, model.family)
            return cls.from_pretrained(path, safety_checker=None)
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            if not path.is_file():
                raise ConfigError(f"model checkpoint {path} does not exist")
            return cls.from_single_file(str(path))
        if _looks_local(base) or path.exists():
            raise ConfigError(f"model folder {path} does not exist")
        log.info("loading %s from the hub", base)
        return cls.from_pretrained(base, revision=model.revision or None)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot load model {base!r}: {type(exc).__name__}: {exc}") from None


def resolve_prediction(model: ModelConfig, scheduler_config: Any) -> str:
    """The prediction type to train: the run's, or with ``auto`` the model scheduler's.

    Raises:
        ConfigError: with ``auto``, a scheduler predicting something we do not train, or an
            SDXL model whose scheduler predicts v (SDXL trains epsilon only).
    """
    # Schedulers saved before diffusers had the key predict noise.
    own = str(scheduler_config.get("prediction_type") or "epsilon")
    if model.prediction == "auto":
        if own not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"{model.base}: the scheduler predicts {own!r}; set model.prediction to "
                "epsilon or v_prediction"
            )
        if model.family == "sdxl" and own != "epsilon":
            raise ConfigError(
                f"{model.base}: the scheduler predicts {own}, but SDXL models train epsilon "
                "only here"
            )
        log.info("prediction type %s (the model's scheduler)", own)
        return own
    if model.prediction != own:
        log.warning("model.prediction = %s in the run config, but the model's scheduler says "
                    "%s; training %s as the run says", model.prediction, own, model.prediction)
    log.info("prediction type %s (the run config)", model.prediction)
    return model.prediction


def load_components(model: ModelConfig) -> Components:
    from diffusers import DDPMScheduler

    pipe = load_pipeline(model)
    prediction = resolve_prediction(model, pipe.scheduler.config)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    tokenizers = [pipe.tokenizer]
    encoders = [pipe.text_encoder]
    if model.family == "sdxl":
        tokenizers.append(pipe.tokenizer_2)
        encoders.append(pipe.text_encoder_2)
    for module in (pipe.vae, *encoders, pipe.unet):
        module.requires_grad_(False)
    # Master weights in fp32 whatever the checkpoint holds; autocast does the rest.
    pipe.unet.float()
    pipe.vae.float()
    return Components(
        family=model.family,
        prediction=prediction,
        unet=pipe.unet,
        vae=pipe.vae,
        noise_scheduler=scheduler,
        tokenizers=tokenizers,
        text_encoders=encoders,
        source=model.base,
    )


def lora_targets(name: str, module: nn.Module, training: TrainingConfig) -> tuple[list[str],
                                                                                 list[str]]:
    """(layers to adapt, the 3x3 convolutions among them) of ``module`` (``unet`` or a text
    encoder) for ``training.lora_layers``."""
    layers = training.lora_layers
    if name != "unet":
        return TEXT_LORA_TARGETS + (TEXT_MLP_TARGETS if layers != "attention" else []), []
    if layers == "attention":
        return UNET_LORA_TARGETS, []
    targets, convs = [], []
    for path, sub in module.named_modules():
        if not isinstance(sub, nn.Linear | nn.Conv2d):
            continue
        if ".attentions." in path:
            targets.append(path)
        elif layers == "locon" and any(f".{block}." in path for block in
                                       ("resnets", "downsamplers", "upsamplers")):
            targets.append(path)
            if isinstance(sub, nn.Conv2d) and sub.kernel_size != (1, 1):
                convs.append(path)
    return targets, convs


def add_lora(module: nn.Module, targets: list[str], rank: int, alpha: float,
             convs: tuple[list[str], int, float] | None = None) -> None:
    """LoRA adapters on ``targets`` of ``module``, injected by peft itself.

    diffusers' and transformers' ``add_adapter`` wrap the same injection but each demands a
    minimum peft release of its own (transformers 5 asks for one newer than any published),
    so a text encoder could not train LoRA with the newest of both; peft's injection works
    on any module, with parameter names (``...lora_A.default.weight``) that checkpoints and
    exports already use.

    Raises:
        ConfigError: peft cannot put adapters on this module (no target layer matched).
    """
    from peft import LoraConfig, inject_adapter_in_model

    # The 3x3 convolutions of a LoCon adapter take a rank and alpha of their own, as kohya's.
    conv_names, conv_rank, conv_alpha = convs or ([], rank, alpha)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft takes floats
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern={re.escape(n): conv_rank for n in conv_names},
        alpha_pattern={re.escape(n): conv_alpha for n in conv_names},
    )
    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise ConfigError(f"cannot add LoRA adapters to {type(module).__name__}: {exc}") from None


def select_trainable(c: Components, training: TrainingConfig, seed: int) -> None:
    """Mark what trains (the UNet, or LoRA adapters on it; text encoders when asked) and list
    it in ``c.trainable``. LoRA weights start from ``seed``, so every peer starts equal."""
    torch.manual_seed(seed)
    modules: list[tuple[str, Any]] = [("unet", c.unet)]
    if training.train_text_encoder:
        modules += [(f"text_encoder_{i}", enc) for i, enc in enumerate(c.text_encoders)]
    if training.method == "lora":
        for name, module in modules:
            targets, convs = lora_targets(name, module, training)
            add_lora(module, targets, training.lora_rank, training.lora_alpha,
                     (convs, training.lora_conv_rank or training.lora_rank,
                      training.lora_conv_alpha or training.lora_alpha))
        if training.lora_init:
            from dandelion_p2p.worker.kohya_lora import start_from

            start_from(c, training.lora_init, training.lora_init_sha256)
    else:
        for _, module in modules:
            module.requires_grad_(True)
    c.trainable = [
        (f"{name}.{pname}", p)
        for name, module in modules
        for pname, p in module.named_parameters()
        if p.requires_grad
    ]
    for _, p in c.trainable:
        p.data = p.data.float()
    count = sum(p.numel() for _, p in c.trainable)
    log.info("training %s: %d tensors, %d parameters", training.method, len(c.trainable), count)


def use_attention(c: Components, wanted: str) -> str:
    """SDPA unless xformers is asked for and actually runs here; returns what is used."""
    if wanted != "xformers":
        return "sdpa"
    try:
        import xformers.ops

        device = next(c.unet.parameters()).device
        q = torch.zeros(1, 8, 1, 8, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        c.unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as exc:
        log.warning("xformers unavailable here (%s: %s); using torch SDPA attention",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return "sdpa"


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, betas: tuple[float, float],
                   weight_decay: float, eps: float) -> torch.optim.Optimizer:
    """AdamW, 8-bit from bitsandbytes when asked and usable, else torch's (with a message)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(
                params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps
            )
            log.info("optimizer: 8-bit AdamW (bitsandbytes)")
            return optimizer
        except Exception as exc:
            log.warning(
                "8-bit AdamW unavailable (%s: %s); falling back to torch AdamW, which keeps "
                "optimizer state in fp32 (4x the memory)", type(exc).__name__, exc
            )
    log.info("optimizer: torch AdamW")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def flat_views(params: Iterable[torch.Tensor], flat: torch.Tensor
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter beside its part of ``flat``, shaped like it: the layout every flat
    vector of a run shares (``flatten_into``, ``assign_from``, a checkpoint of G)."""
    offset = 0
    for p in params:
        n = p.numel()
        yield p, flat[offset : offset + n].view_as(p)
        offset += n


def flatten_into(params: list[nn.Parameter], out: torch.Tensor, grads: bool = False) -> None:
    """Copy parameters (or their gradients) into the flat float32 ``out``, in order."""
    for p, part in flat_views(params, out):
        source = p.grad if grads else p.data
        if source is None:
            part.zero_()
        else:
            part.copy_(source.detach())


def assign_from(params: list[nn.Parameter], flat: torch.Tensor, grads: bool = False) -> None:
    """The inverse of ``flatten_into``."""
    for p, part in flat_views(params, flat):
        values = part.to(p.device, p.dtype)
        if grads:
            if p.grad is None:
                p.grad = values.clone()
            else:
                p.grad.copy_(values)
        else:
            p.data.copy_(values)
