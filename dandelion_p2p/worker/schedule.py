"""The learning-rate schedule: a pure function of the swarm's global step, so every peer
computes the same rate at the same step, after any restart.

The rate of each parameter group is its base rate (``optimizer.unet_lr`` or
``text_encoder_lr``, else ``optimizer.lr``) times the schedule's factor at the step. The
cosine-with-restarts and polynomial factors are diffusers' own (``diffusers.optimization``),
the functions its example scripts use, read from the LambdaLR they build.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from dandelion_p2p.runconfig.schema import RunConfig, ScheduleConfig

Role = str
"""Which base rate a parameter group takes: ``"unet"`` or ``"text_encoder"``."""


def base_lr(config: RunConfig, role: Role = "unet") -> float:
    o = config.optimizer
    own = o.text_encoder_lr if role == "text_encoder" else o.unet_lr
    return own or o.lr


def lr_factor(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """The schedule's multiplier of the base rate for the step from ``step`` to ``step + 1``."""
    warmup = schedule.warmup_steps
    if schedule.name in ("cosine_with_restarts", "polynomial"):
        return _diffusers_lambda(schedule, max_steps)(step)
    if schedule.name != "constant" and warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule.name in ("constant", "constant_with_warmup"):
        return 1.0
    floor = schedule.min_lr_ratio
    span = max(1, max_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule.name == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, config: RunConfig, role: Role = "unet") -> float:
    """Learning rate of ``role``'s parameters for the optimizer step that takes the run from
    ``step`` to ``step + 1``."""
    return base_lr(config, role) * lr_factor(step, config.schedule,
                                             config.training.max_steps)


@functools.lru_cache(maxsize=8)
def _diffusers_lambda(schedule: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    import torch
    from diffusers.optimization import (
        get_cosine_with_hard_restarts_schedule_with_warmup,
        get_polynomial_decay_schedule_with_warmup,
    )

    # A throwaway optimizer at rate 1: the LambdaLR's function is then the factor itself.
    # lr_end is absolute in diffusers: at rate 1 it is the floor as a fraction.
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule.name == "polynomial":
        scheduler = get_polynomial_decay_schedule_with_warmup(
            dummy, schedule.warmup_steps, max_steps, lr_end=schedule.min_lr_ratio,
            power=schedule.power)
    else:
        scheduler = get_cosine_with_hard_restarts_schedule_with_warmup(
            dummy, schedule.warmup_steps, max_steps, num_cycles=schedule.num_cycles)
    function: Callable[[int], float] = scheduler.lr_lambdas[0]
    return function
