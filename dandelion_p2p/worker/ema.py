"""An exponential moving average of the trained parameters.

It lives in host memory when training on a GPU: a copy of every trained weight is memory the
GPU needs more (an SD 1.5 UNet is 3.4 GB in fp32)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn


class Ema:
    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float,
                 device: torch.device | None = None) -> None:
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().to(device or p.device, copy=True) for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def restart(self) -> None:
        """Average from the current weights on, as from a fresh start (a joiner that
        downloaded no EMA: the one it has is of the weights it started from)."""
        for s, p in zip(self.shadow, self.params, strict=True):
            s.copy_(p.detach())
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # A short warm-up (as diffusers' EMAModel): early averages would otherwise be
        # dominated by the untrained start.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params, strict=True):
            # A blocking copy: a non-blocking one to host memory hands lerp_ a pinned buffer
            # the GPU may not have filled yet, and the average silently takes stale values.
            s.lerp_(p.detach().to(s.device), 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the trained parameters for the duration; the trained weights
        are back afterwards, bit for bit, even if the body raises."""
        with torch.no_grad():
            # Kept on the EMA's device (host memory when training on a GPU), like the EMA.
            saved = [p.detach().to(s.device, copy=True)
                     for s, p in zip(self.shadow, self.params, strict=True)]
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for kept, p in zip(saved, self.params, strict=True):
                    p.copy_(kept)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: s for name, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name, s in zip(self.names, self.shadow, strict=True):
            s.copy_(state[name])
        self.updates = updates


def chosen_weights(choice: Literal["ema", "raw"],
                   ema: Ema | None) -> contextlib.AbstractContextManager[None]:
    """The weights ``choice`` (a resolved ``export.weights``) names, in place for the
    duration: the EMA swapped in, or the trained weights as they are."""
    if choice == "raw":
        return contextlib.nullcontext()
    if ema is None:
        raise ValueError("the EMA weights were asked for, but this run keeps no EMA")
    return ema.swapped_in()
