"""Gradient mode's rule for a split round: every part of it applies nothing, and a peer's
carried gradient joins the next step's as if both steps' samples were one batch."""

from __future__ import annotations

import torch
from torch import nn

from dandelion_p2p.worker.link import SyncOutcome
from dandelion_p2p.worker.lockstep import carry_gradients, split_round


def outcome(members: int, averaged: bool = True, fraction: float = 1.0) -> SyncOutcome:
    return SyncOutcome(round=7, averaged=averaged, fraction_averaged=fraction if averaged else 0.0,
                       members=members, seconds=0.1)


def test_every_part_of_a_split_swarm_sees_a_split_round() -> None:
    assert not split_round(outcome(4), expected_peers=4)
    assert not split_round(outcome(5), expected_peers=4), "a newcomer joined"
    # Four peers split into two pairs, or three and one: every part sees fewer than four.
    assert split_round(outcome(2), expected_peers=4)
    assert split_round(outcome(3), expected_peers=4)
    assert split_round(outcome(1, averaged=False), expected_peers=4)
    # The group finished the round without this peer (members: that group, this one too).
    assert split_round(outcome(4, averaged=False), expected_peers=4)
    assert split_round(outcome(4, fraction=0.75), expected_peers=4)
    # A peer with nobody around trains alone, as before.
    assert not split_round(outcome(1, averaged=False), expected_peers=1)


def mean_gradient(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    ((model(x) - y) ** 2).sum(dim=1).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_a_carried_gradient_and_the_next_steps_make_the_mean_over_both() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    params = list(model.parameters())
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    expected = mean_gradient(model, x, y)

    # Step 1 as the trainer takes it: summed loss, then the mean over its 2 samples.
    model.zero_grad()
    ((model(x[:2]) - y[:2]) ** 2).sum(dim=1).sum().backward()
    for p in params:
        assert p.grad is not None
        p.grad.mul_(1 / 2)
    carry_gradients(params, 2, torch.amp.GradScaler("cpu", enabled=False))
    # Step 2 adds its 4 samples' summed loss and takes the mean over all 6.
    ((model(x[2:]) - y[2:]) ** 2).sum(dim=1).sum().backward()
    for p in params:
        assert p.grad is not None
        p.grad.mul_(1 / 6)
    for p, want in zip(params, expected, strict=True):
        assert p.grad is not None and torch.allclose(p.grad, want, atol=1e-6)
