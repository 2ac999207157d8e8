"""What a checkpoint brings back into a trainer, and what a joiner's download may leave out.

A checkpoint this worker wrote holds all of its state. One downloaded to join the swarm may
hold less (``sync/partial_state``): with an outer optimizer, the swarm's state is that
optimizer's (the global weights and the outer momentum), and the rest is the writer's own:
its inner optimizer's moments, loss scaler, random generators, local progress. A joiner takes
the global weights as its own and keeps its own inner optimizer, scaler and generators (a
joiner that took another peer's generators would draw that peer's noise).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.worker.checkpoint import Checkpoint
from dandelion_p2p.worker.model import assign_from
from dandelion_p2p.worker.optimizers import load_optimizer_state

if TYPE_CHECKING:
    from dandelion_p2p.worker.train import Trainer

log = logging.getLogger(__name__)

WRITERS_STATE = ("optimizer.pt", "scaler.pt", "rng.pt")
"""The writer's inner optimizer, loss scale and random generators: loaded when a checkpoint
holds them, this worker's own kept otherwise."""
OWN_FILES = ("trainable.safetensors", *WRITERS_STATE, "local.safetensors")
"""The files of a checkpoint a worker with an outer optimizer joins without."""


def leave_out(trainer: Trainer) -> tuple[str, ...]:
    """The checkpoint files a download of the swarm's state for ``trainer`` skips. Without an
    outer optimizer (gradient mode) every peer's inner optimizer steps on the same averaged
    gradients, so its state is the swarm's too: nothing is left out. The EMA is downloaded
    for a trainer that keeps one (exports of it would otherwise start from the base model)."""
    if trainer.outer is None:
        return ()
    return OWN_FILES if trainer.ema is not None else (*OWN_FILES, "ema.safetensors")


def restore(trainer: Trainer, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint`` into ``trainer``: its weights (the outer optimizer's global weights
    when it holds no others), then whatever else of the trainer's state it holds."""
    names = [name for name, _ in trainer.c.trainable]
    if checkpoint.meta.get("names") != names or checkpoint.meta.get("run") != trainer.config.name:
        raise ConfigError(
            f"checkpoint {checkpoint.path} belongs to another run or model; move it away "
            "or give this run another work folder"
        )
    outer = trainer.outer if checkpoint.has("outer.safetensors") else None
    if outer is not None:
        outer.load_state_dict(checkpoint.tensors("outer"))
    if checkpoint.has("trainable.safetensors"):
        trained = checkpoint.tensors("trainable")
        with torch.no_grad():
            for name, param in trainer.c.trainable:
                param.copy_(trained[name])
    elif outer is not None:
        assign_from(trainer.params, outer.start)
    else:
        raise ConfigError(f"checkpoint {checkpoint.path} holds no weights")
    if trainer.ema is not None:
        if checkpoint.has("ema.safetensors"):
            trainer.ema.load_state_dict(checkpoint.tensors("ema"),
                                        checkpoint.meta["ema_updates"])
        else:
            trainer.ema.restart()
    if trainer.overlap is not None:
        trainer.overlap.restore_local(checkpoint)
    own = [name for name in WRITERS_STATE if checkpoint.has(name)]
    if "optimizer.pt" in own:
        load_optimizer_state(trainer.optimizer, checkpoint.blob("optimizer"))
    if "scaler.pt" in own:
        trainer.scaler.load_state_dict(checkpoint.blob("scaler"))
    if "rng.pt" in own:
        rng = checkpoint.blob("rng")
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    if trainer.outer is None and "optimizer.pt" not in own:
        log.warning("checkpoint %s holds no optimizer state: in gradient mode this peer's "
                    "optimizer then differs from the swarm's", checkpoint.path.name)
    if len(own) < len(WRITERS_STATE):
        log.info("checkpoint %s holds the swarm's state alone: this peer keeps its own inner "
                 "optimizer state, loss scale and random generators", checkpoint.path.name)
    for key, value in checkpoint.meta["position"].items():
        setattr(trainer.position, key, value)
