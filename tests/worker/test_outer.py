"""The outer optimizer's look-ahead (``OuterNesterov.look_ahead``): where the start weights
land after a step with a given pseudo-gradient, computed without taking that step. An
overlapping worker trains on from there while the swarm averages the round."""

from __future__ import annotations

import torch

from dandelion_p2p.worker import fragments
from dandelion_p2p.worker.outer import OuterNesterov


def optimizer_after_two_steps() -> OuterNesterov:
    gen = torch.Generator().manual_seed(3)
    outer = OuterNesterov(torch.randn(1000, generator=gen), lr=0.7, momentum=0.9)
    for _ in range(2):
        outer.step(torch.randn(1000, generator=gen) * 0.01)
    return outer


def test_the_look_ahead_lands_where_the_step_does_and_takes_no_step() -> None:
    outer = optimizer_after_two_steps()
    start, momentum = outer.start.clone(), outer.momentum_buffer.clone()
    pseudo_gradient = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 0.01
    ahead = torch.empty(1000)
    outer.look_ahead(pseudo_gradient, ahead)
    assert torch.equal(outer.start, start) and torch.equal(outer.momentum_buffer, momentum)
    stepped = outer.step(pseudo_gradient).clone()
    torch.testing.assert_close(ahead, stepped, rtol=0, atol=1e-6)
    # With momentum behind it, the step goes further than the pseudo-gradient alone.
    assert torch.linalg.norm(start - ahead) > torch.linalg.norm(pseudo_gradient)


def test_a_longer_reach_lands_where_a_step_with_the_pushed_guess_does() -> None:
    outer = optimizer_after_two_steps()
    own = torch.randn(1000, generator=torch.Generator().manual_seed(6)) * 0.01
    ahead = torch.empty(1000)
    outer.look_ahead(own, ahead, reach=1.5)
    guess = 1.5 * own - 0.5 * (1 - outer.momentum) * outer.momentum_buffer
    torch.testing.assert_close(ahead, outer.step(guess), rtol=0, atol=1e-6)


def test_steps_on_each_fragment_in_turn_match_one_step_on_the_whole_vector() -> None:
    whole, parts = optimizer_after_two_steps(), optimizer_after_two_steps()
    averaged = torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 0.01
    ahead_whole, ahead_parts = torch.empty(1000), torch.full((1000,), float("nan"))
    whole.look_ahead(averaged, ahead_whole)
    for fragment in range(3):
        span = fragments.span(3, fragment, 1000)
        parts.look_ahead(averaged, ahead_parts, span)
        before = parts.start.clone()
        parts.step(averaged, span)
        a, b = span
        # A fragment's step leaves every element outside it, and its momentum, untouched.
        assert torch.equal(parts.start[:a], before[:a])
        assert torch.equal(parts.start[b:], before[b:])
    whole.step(averaged)
    assert torch.equal(ahead_parts, ahead_whole)
    assert torch.equal(parts.start, whole.start)
    assert torch.equal(parts.momentum_buffer, whole.momentum_buffer)
