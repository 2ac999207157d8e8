"""A joiner's chain of kept rounds (``joining``): the rounds it took part in while its state
downloaded are applied in order from the state on; rounds kept beyond a round it missed wait
for a newer state that they follow on from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dandelion_p2p.worker.joining import apply_kept, kept_rounds
from dandelion_p2p.worker.model import flatten_into
from tests.worker.test_left_behind import trainer_for


def test_rounds_kept_beyond_a_missed_one_wait_for_a_newer_state(
    tmp_path: Path, tiny_sd1: Path, images: Path
) -> None:
    trainer = trainer_for(tmp_path, "joiner", tiny_sd1, images)
    try:
        assert trainer.outer is not None
        kept = kept_rounds(trainer)
        rng = np.random.default_rng(0)
        vectors = {r: rng.standard_normal(trainer.n_elements).astype(np.float32) * 1e-3
                   for r in (1, 2, 4)}
        for r, v in vectors.items():
            kept.keep(r, 3, v)

        # From step 0: rounds 1 and 2 follow on; 4 waits beyond the missing round 3.
        applied, beyond_gap = apply_kept(trainer)
        assert (applied, beyond_gap) == (2, True)
        assert trainer.position.global_step == 2
        assert list(kept.rounds()) == [4]

        # A newer state of step 3 (round 3 applied by the swarm): round 4 follows on.
        start = trainer.outer.start.clone()
        trainer.position.global_step = 3
        applied, beyond_gap = apply_kept(trainer)
        assert (applied, beyond_gap) == (1, False)
        assert trainer.position.global_step == 4
        assert kept.rounds() == {}
        # Round 4's outer step moved the start weights, and the weights are the new start.
        assert not torch.equal(trainer.outer.start, start)
        flatten_into(trainer.params, trainer.flat)
        assert torch.equal(trainer.flat, trainer.outer.start)
    finally:
        trainer.close()


def test_nothing_kept_applies_nothing(tmp_path: Path, tiny_sd1: Path, images: Path) -> None:
    trainer = trainer_for(tmp_path, "joiner", tiny_sd1, images)
    try:
        assert apply_kept(trainer) == (0, False)
        assert trainer.position.global_step == 0
    finally:
        trainer.close()
