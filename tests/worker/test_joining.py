"""A joiner's chain of kept rounds (``joining``): the averaged rounds it fetched are applied
in order from the state on, and kept in turn for later joiners; rounds beyond a missing one
wait for a state they follow on from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dandelion_p2p.worker.joining import apply_kept, kept_rounds
from dandelion_p2p.worker.model import flatten_into
from dandelion_p2p.worker.served_rounds import HEADER, MAGIC, decode_round, encode_round
from tests.worker.test_left_behind import trainer_for


def test_rounds_beyond_a_missing_one_wait_for_a_state_they_follow_on_from(
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
        assert apply_kept(trainer) == 2
        assert trainer.position.global_step == 2
        assert list(kept.rounds()) == [4]

        # A newer state of step 3 (round 3 applied by the swarm): round 4 follows on.
        start = trainer.outer.start.clone()
        trainer.position.global_step = 3
        assert apply_kept(trainer) == 1
        assert trainer.position.global_step == 4
        assert kept.rounds() == {}
        # Round 4's outer step moved the start weights, and the weights are the new start.
        assert not torch.equal(trainer.outer.start, start)
        flatten_into(trainer.params, trainer.flat)
        assert torch.equal(trainer.flat, trainer.outer.start)
        # The rounds applied are kept for later joiners, as every member keeps them.
        trainer.checkpoints.rounds.wait()
        served = sorted(p.name for p in (trainer.checkpoints.root / "rounds").iterdir())
        assert served == [f"round-0000000{r}-3.bin" for r in (1, 2, 4)]
        data = (trainer.checkpoints.root / "rounds" / served[2]).read_bytes()
        assert np.array_equal(decode_round(data, trainer.n_elements), vectors[4])
    finally:
        trainer.close()


def test_nothing_kept_applies_nothing(tmp_path: Path, tiny_sd1: Path, images: Path) -> None:
    trainer = trainer_for(tmp_path, "joiner", tiny_sd1, images)
    try:
        assert apply_kept(trainer) == 0
        assert trainer.position.global_step == 0
    finally:
        trainer.close()


def test_a_kept_round_of_another_size_or_not_finite_is_not_applied(
        tmp_path: Path, tiny_sd1: Path, images: Path) -> None:
    trainer = trainer_for(tmp_path, "joiner", tiny_sd1, images)
    try:
        kept = kept_rounds(trainer)
        n = trainer.n_elements
        kept.keep(1, 3, np.full(n, 1e-3, dtype=np.float32))
        not_finite = np.full(n, 1e-3, dtype=np.float32)
        not_finite[7] = np.nan
        (kept.folder / "round-00000002-3.bin").write_bytes(
            HEADER.pack(MAGIC, b"none", n, 0) + not_finite.tobytes())
        kept.keep(3, 3, np.zeros(n, dtype=np.float32))
        assert apply_kept(trainer) == 1
        assert trainer.position.global_step == 1
        assert not (kept.folder / "round-00000002-3.bin").exists()
        for wrong in (encode_round(np.zeros(n - 1, dtype=np.float32), "int8"), b"not a round"):
            (kept.folder / "round-00000002-3.bin").write_bytes(wrong)
            assert apply_kept(trainer) == 0
            assert trainer.position.global_step == 1
    finally:
        trainer.close()
