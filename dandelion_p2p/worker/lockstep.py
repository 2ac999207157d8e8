"""Gradient mode keeps every peer on the same weights: the rule for a round that split.

Gradient mode never averages weights, so the peers hold the same weights only as long as every
peer applies the same averaged gradient at every step. A round that did not gather the group
the peer expected (the members of its last round) breaks that: when four peers split into two
pairs, or three and one, each part would apply a different average, and the peers would hold
different weights from then on. Every part of a split round sees fewer members than it
expected, so every part applies nothing: each peer keeps its own gradient sum and adds it to
the next step's, and the next full round averages both steps' samples at once. No sample is
lost and the weights stay the same on every peer.
"""

from __future__ import annotations

import torch
from torch import nn

from dandelion_p2p.worker.link import SyncOutcome


def split_round(outcome: SyncOutcome, expected_peers: int) -> bool:
    """The round gathered fewer members than the last one (a peer left, or the swarm split
    into parts that each averaged alone), the peer's group finished without it (``members``
    then counts that group, which went on without this gradient: it split from this peer), or
    part of the vector was not averaged."""
    if outcome.members < expected_peers or (not outcome.averaged and outcome.members > 1):
        return True
    return outcome.averaged and outcome.fraction_averaged < 1.0


def carry_gradients(params: list[nn.Parameter], samples: int,
                    scaler: torch.amp.GradScaler) -> None:
    """Turn this step's mean gradient (already unscaled) back into the sum over its
    ``samples``, in the scale the next backward passes add theirs in."""
    if scaler.is_enabled():
        # unscale_ ran for this step: update() closes it so the next step may unscale again.
        scaler.update()
    factor = samples * float(scaler.get_scale()) if scaler.is_enabled() else float(samples)
    for param in params:
        if param.grad is not None:
            param.grad.mul_(factor)
