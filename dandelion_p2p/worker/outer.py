"""The outer optimizer of local-steps training (DiLoCo): Nesterov momentum on the swarm's
averaged pseudo-gradient. It works on flat float32 vectors kept on the CPU, so the start
weights and the momentum cost host memory, not GPU memory.

Every peer holds the same start weights and momentum and receives the same averaged
pseudo-gradient, so every peer computes the same new weights, bit for bit.
"""

from __future__ import annotations

import torch


class OuterNesterov:
    def __init__(self, start: torch.Tensor, lr: float, momentum: float) -> None:
        self.start = start.clone()
        self.momentum_buffer = torch.zeros_like(self.start)
        self.lr = lr
        self.momentum = momentum

    def pseudo_gradient(self, current: torch.Tensor, out: torch.Tensor) -> None:
        """``out = start - current``: how far the local steps moved."""
        torch.sub(self.start, current, out=out)

    def step(self, averaged: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
        """Apply the averaged pseudo-gradient; returns (and remembers) the new start weights.
        ``span``: [start, stop) of the elements the round averaged (a streaming fragment,
        ``fragments``); the others, their momentum included, stay as they are."""
        a, b = span if span is not None else (0, self.start.numel())
        g = averaged[a:b]
        momentum = self.momentum_buffer[a:b]
        momentum.mul_(self.momentum).add_(g)
        update = g + self.momentum * momentum
        self.start[a:b].sub_(update, alpha=self.lr)
        return self.start

    def look_ahead(self, pseudo_gradient: torch.Tensor, out: torch.Tensor,
                   span: tuple[int, int] | None = None, *, reach: float = 1.0) -> None:
        """``out`` = the start weights after a step with a guess of the swarm's average,
        leaving the start and the momentum as they are: where the swarm's step will about
        land while its average is still being made (``overlap``). The guess is this peer's
        ``pseudo_gradient`` g at ``reach`` 1; beyond 1 it is pushed further from the
        momentum's running mean of past averages, (1 - m) x momentum:
        ``reach * g + (1 - reach) * (1 - m) * momentum``. With ``span`` only those elements
        of ``out`` are written."""
        a, b = span if span is not None else (0, self.start.numel())
        target = out[a:b]
        m = self.momentum
        # The step's update, (1 + m) * guess + m^2 * momentum, without a vector for the guess.
        torch.mul(self.momentum_buffer[a:b], m * m + (1 + m) * (1 - reach) * (1 - m),
                  out=target)
        target.add_(pseudo_gradient[a:b], alpha=(1.0 + m) * reach)
        target.mul_(-self.lr).add_(self.start[a:b])

    def restart_from(self, current: torch.Tensor) -> torch.Tensor:
        """A round this peer had to itself: the next local steps start from ``current``, and
        the momentum stays what the swarm's rounds made it (a lone peer's own progress is not
        extrapolated). Returns the new start weights."""
        self.start.copy_(current)
        return self.start

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"start": self.start, "momentum": self.momentum_buffer}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["start"].shape != self.start.shape:
            raise ValueError("outer optimizer state does not match the trained parameters")
        self.start.copy_(state["start"])
        self.momentum_buffer.copy_(state["momentum"])
