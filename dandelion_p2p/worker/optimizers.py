"""The inner optimizer: one parameter group per part of the model (UNet, text encoders), each
with its own base learning rate, built from the run config.

AdamW (torch, or 8-bit from bitsandbytes), Prodigy (the ``prodigyopt`` package) and
Adafactor (``transformers.optimization``). The schedule's rate goes into every group before
each step (``set_learning_rates``); the settings a run config version may change between
rounds go in with ``apply_live_settings``, in each optimizer's own terms.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.model import make_optimizer
from dandelion_p2p.worker.schedule import Role, base_lr, lr_factor

log = logging.getLogger(__name__)

ROLE = "role"
"""The key naming a group's base rate; kept in the group, so in checkpoints too."""


def role_of(name: str) -> Role:
    """``text_encoder`` for a text encoder's parameter (``text_encoder_0.…``), else ``unet``."""
    return "text_encoder" if name.startswith("text_encoder") else "unet"


def param_groups(trainable: Sequence[tuple[str, nn.Parameter]],
                 config: RunConfig) -> list[dict[str, Any]]:
    """The trainable parameters grouped by role, in the order of ``trainable`` within each."""
    groups: dict[Role, list[nn.Parameter]] = {}
    for name, param in trainable:
        groups.setdefault(role_of(name), []).append(param)
    return [{"params": params, ROLE: role, "lr": base_lr(config, role)}
            for role, params in groups.items()]


def build_optimizer(trainable: Sequence[tuple[str, nn.Parameter]], config: RunConfig,
                    eight_bit_allowed: bool = True) -> torch.optim.Optimizer:
    """The optimizer the run config names, over ``trainable`` in per-role groups.

    Raises:
        ConfigError: the optimizer's package cannot be imported, or Prodigy is asked for
            different rates per group (it estimates one step size for all).
    """
    o = config.optimizer
    name = o.name
    groups = param_groups(trainable, config)
    if name == "adamw8bit" and not eight_bit_allowed:
        log.info("8-bit AdamW turned off in this machine's settings")
        name = "adamw"
    if name in ("adamw", "adamw8bit"):
        # make_optimizer takes a flat list; the groups carry their own rate and role.
        return make_optimizer(groups, name, o.lr,  # type: ignore[arg-type]
                              (o.beta1, o.beta2), o.weight_decay, o.eps)
    if name == "prodigy":
        if len({g["lr"] for g in groups}) > 1:
            raise ConfigError("Prodigy estimates one step size for all parameters: "
                              "optimizer.unet_lr and text_encoder_lr must be equal (or 0)")
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer.name = prodigy needs the prodigyopt package "
                              "(pip install prodigyopt)") from None
        log.info("optimizer: Prodigy (d_coef %g)", o.d_coef)
        optimizer: torch.optim.Optimizer = Prodigy(
            groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
            weight_decay=o.weight_decay, d_coef=o.d_coef)
        return optimizer
    from transformers.optimization import Adafactor

    log.info("optimizer: Adafactor (external learning rate, no relative step)")
    # The schedule sets the rate, as for every optimizer here: Adafactor's own relative-step
    # rate and parameter scaling are off (what the diffusers and kohya scripts use with a
    # given rate).
    return Adafactor(groups, lr=o.lr, weight_decay=o.weight_decay, scale_parameter=False,
                     relative_step=False, warmup_init=False)


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, config: RunConfig) -> None:
    """Every group's rate for the step from ``step`` to ``step + 1``."""
    factor = lr_factor(step, config.schedule, config.training.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = base_lr(config, group.get(ROLE, "unet")) * factor


def apply_live_settings(optimizer: torch.optim.Optimizer, config: RunConfig) -> None:
    """The hyperparameters a run config version may change, into each group."""
    o = config.optimizer
    for group in optimizer.param_groups:
        group["weight_decay"] = o.weight_decay
        if "betas" in group:
            group["betas"] = (o.beta1, o.beta2)
        if "d_coef" in group:  # Prodigy
            group["d_coef"] = o.d_coef
        # Adafactor's eps is a pair of its own (regularisers of the factored second
        # moment), not AdamW's denominator term.
        if not isinstance(group.get("eps"), tuple | list):
            group["eps"] = o.eps


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, also for a checkpoint written before the parameters
    were grouped by role (one group holding them all, in the same order)."""
    saved = state.get("param_groups", [])
    ours = optimizer.param_groups
    if len(saved) == 1 and len(ours) > 1:
        ids = list(saved[0]["params"])
        sizes = [len(group["params"]) for group in ours]
        if len(ids) == sum(sizes):
            groups, start = [], 0
            for group, size in zip(ours, sizes, strict=True):
                groups.append({**saved[0], ROLE: group[ROLE], "params": ids[start:start + size]})
                start += size
            state = {**state, "param_groups": groups}
            log.info("optimizer state of one group split into %d groups by role", len(ours))
    optimizer.load_state_dict(state)
