"""A peer alone in its rounds trains with its inner optimizer only: a round of one member
takes no outer step on the peer's own progress unless ``sync.outer_step_alone`` says so."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.link import SoloLink
from dandelion_p2p.worker.train import Trainer, WorkerOptions, vector_digest
from tests.worker.runconfigs import tiny_run


def train(config: RunConfig, images: Path, work: Path, stop_at: int = 0) -> Trainer:
    toml = work.parent / f"{work.name}.toml"
    toml.write_text(config.to_toml())
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, export=False,
                                            device="cpu", stop_at=stop_at), SoloLink(toml))
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in trainer.c.trainable]


def test_rounds_alone_leave_the_inner_optimizers_path_unchanged(tiny_sd1: Path, images: Path,
                                                                tmp_path: Path) -> None:
    def run(work: str, **sync: object) -> Trainer:
        # Blocking rounds: equal bit for bit (overlapped ones: test_overlap.py).
        config = tiny_run(tiny_sd1, training={"max_steps": 3},
                          sync={"overlap": False, **sync}, checkpoint={"every_steps": 1})
        return train(config, images, tmp_path / work)

    never_synced = run("never", local_steps=100)
    alone = run("alone", local_steps=1)
    for a, b in zip(weights(never_synced), weights(alone), strict=True):
        assert torch.equal(a, b)
    assert alone.outer is not None
    flat = torch.cat([w.reshape(-1) for w in weights(alone)])
    assert torch.equal(alone.outer.start, flat), "the next round starts from here"
    assert not alone.outer.momentum_buffer.any(), "no momentum from a peer's own progress"
    rounds = [json.loads(line) for line in (tmp_path / "alone/sync_log.jsonl").open()]
    assert [r["members"] for r in rounds] == [1, 1, 1]
    assert rounds[-1]["digest"] == vector_digest(flat)

    outer_alone = run("outer-alone", local_steps=1, outer_step_alone=True)
    assert any(not torch.equal(a, b)
               for a, b in zip(weights(never_synced), weights(outer_alone), strict=True))


def test_a_resumed_lone_peer_equals_an_uninterrupted_one(tiny_sd1: Path, images: Path,
                                                         tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 4}, sync={"local_steps": 2},
                      checkpoint={"every_steps": 1})
    straight = train(config, images, tmp_path / "straight")
    train(config, images, tmp_path / "resumed", stop_at=3)
    resumed = train(config, images, tmp_path / "resumed")
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)
    assert straight.outer is not None and resumed.outer is not None
    assert torch.equal(straight.outer.start, resumed.outer.start)
