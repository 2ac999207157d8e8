"""The learning-rate schedule: a pure function of the swarm's global step, so every peer
computes the same rate at the same step, after any restart."""

from __future__ import annotations

import math

from dandelion_p2p.runconfig.schema import RunConfig


def lr_at(step: int, config: RunConfig) -> float:
    """Learning rate for the optimizer step that takes the run from ``step`` to ``step + 1``."""
    base = config.optimizer.lr
    schedule = config.schedule
    warmup = schedule.warmup_steps
    if schedule.name != "constant" and warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule.name in ("constant", "constant_with_warmup"):
        return base
    floor = base * schedule.min_lr_ratio
    span = max(1, config.training.max_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule.name == "linear":
        return floor + (base - floor) * (1.0 - progress)
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
