"""Where the worker trains and in which precision: needs torch only, so a GPU machine without
the daemon's network stack (a memory benchmark, say) can use it too."""

from __future__ import annotations

import torch

from dandelion_p2p.errors import ConfigError


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device = cuda, but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_precision(wanted: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Master weights stay fp32 either way."""
    if wanted == "no" or (wanted == "auto" and device.type == "cpu"):
        return None
    if wanted == "fp16":
        return torch.float16
    if wanted == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16
