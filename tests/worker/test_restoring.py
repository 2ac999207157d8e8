"""A joiner that downloaded the swarm's state without another peer's own files (inner
optimizer, loss scaler, random generators) loads it: the global weights become its weights,
and what was left out stays its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dandelion_p2p.sync.partial_state import held_manifest
from dandelion_p2p.worker import restoring
from dandelion_p2p.worker.checkpoint import CheckpointStore
from dandelion_p2p.worker.model import flatten_into
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run
from tests.worker.test_left_behind import run, trainer_for
from tests.worker.test_round_rules import ReportedRounds


def test_a_state_without_the_writers_own_files_loads_as_the_global_weights(
    tmp_path: Path, tiny_sd1: Path, images: Path
) -> None:
    others = trainer_for(tmp_path, "others", tiny_sd1, images)
    run(others)
    written = tmp_path / "others" / "checkpoints" / "step-00000002"

    joiner = trainer_for(tmp_path, "joiner", tiny_sd1, images)
    left_out = restoring.leave_out(joiner)
    assert {"optimizer.pt", "rng.pt", "trainable.safetensors"} <= set(left_out)
    thin = tmp_path / "joiner" / "checkpoints" / written.name
    shutil.copytree(written, thin)
    for name in left_out:
        (thin / name).unlink(missing_ok=True)
    manifest = thin / "manifest.json"
    listed = json.loads(manifest.read_text())["files"]
    rewritten = held_manifest(manifest.read_bytes(), listed, left_out)
    assert rewritten is not None
    manifest.write_bytes(rewritten)

    checkpoint = CheckpointStore(thin.parent, keep_last=4).latest()
    assert checkpoint is not None and checkpoint.step == 2, "the thin folder verifies"
    rng = torch.get_rng_state()
    joiner.restore(checkpoint)
    assert torch.equal(torch.get_rng_state(), rng), "the joiner keeps its own generators"
    assert not joiner.optimizer.state, "and its own (fresh) inner optimizer"
    assert joiner.position.global_step == 2
    assert joiner.outer is not None
    start = CheckpointStore(written.parent, keep_last=4).verify(written).tensors("outer")["start"]
    flatten_into(joiner.params, joiner.flat)
    assert torch.equal(joiner.flat, start), "its weights are the swarm's global weights"
    assert torch.equal(joiner.outer.start, start)
    joiner.close()


def test_a_gradient_mode_joiner_downloads_everything(
    tmp_path: Path, tiny_sd1: Path, images: Path
) -> None:
    # Every peer's inner optimizer steps on the same averaged gradients: its state is the
    # swarm's, which a joiner must hold bit for bit.
    config = tiny_run(tiny_sd1, training={"max_steps": 2}, sync={"mode": "gradient"})
    toml = tmp_path / "gradient.toml"
    toml.write_text(config.to_toml())
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "g",
                                            export=False, device="cpu"),
                      ReportedRounds(toml, {}))
    assert trainer.outer is None and restoring.leave_out(trainer) == ()
    trainer.close()
