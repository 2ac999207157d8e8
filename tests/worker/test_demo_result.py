"""`make demo` fails when its peers end with different weights."""

from __future__ import annotations

from pathlib import Path

import torch

from dandelion_p2p.demo import final_weights_mismatch
from dandelion_p2p.worker.checkpoint import CheckpointStore


def save_weights(work: Path, step: int, weights: dict[str, torch.Tensor]) -> None:
    CheckpointStore(work / "checkpoints", keep_last=2).save(
        step, {}, {"trainable": weights}, {"optimizer": {}}
    )


def test_equal_final_weights_pass(tmp_path: Path) -> None:
    weights = {"unet.a": torch.arange(6.0), "unet.b": torch.ones(2, 2)}
    for peer in ("alice", "bob"):
        save_weights(tmp_path / peer, 4, {"unet.a": torch.zeros(6)})
        save_weights(tmp_path / peer, 8, {k: v.clone() for k, v in weights.items()})
    assert final_weights_mismatch({p: tmp_path / p for p in ("alice", "bob")}) is None


def test_different_final_weights_are_named(tmp_path: Path) -> None:
    save_weights(tmp_path / "alice", 8, {"unet.a": torch.arange(6.0), "unet.b": torch.ones(2)})
    bob_b = torch.ones(2)
    bob_b[1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    save_weights(tmp_path / "bob", 8, {"unet.a": torch.arange(6.0), "unet.b": bob_b})
    problem = final_weights_mismatch({p: tmp_path / p for p in ("alice", "bob")})
    assert problem is not None and "unet.b" in problem and "unet.a" not in problem


def test_peers_that_ended_at_different_steps_or_without_weights_fail(tmp_path: Path) -> None:
    save_weights(tmp_path / "alice", 8, {"unet.a": torch.zeros(3)})
    save_weights(tmp_path / "bob", 4, {"unet.a": torch.zeros(3)})
    works = {p: tmp_path / p for p in ("alice", "bob")}
    problem = final_weights_mismatch(works)
    assert problem is not None and "step 8" in problem and "step 4" in problem
    problem = final_weights_mismatch({**works, "carol": tmp_path / "carol"})
    assert problem is not None and "carol" in problem
