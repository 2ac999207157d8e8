"""Overlapped local steps (``sync.overlap``) of one worker with no swarm: rounds are applied
one boundary late, a lone peer's path is still its inner optimizer's, a checkpoint holds no
round in flight, and a worker stopped with a round in flight resumes on the uninterrupted
path (to float rounding: the stop applied the round early)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import loads
from dandelion_p2p.worker import fragments
from dandelion_p2p.worker.train import Trainer, WorkerOptions, vector_digest
from tests.worker.runconfigs import tiny_run
from tests.worker.test_alone import train, weights
from tests.worker.test_distributed import RecordingLink

# The boundary moves the weights by float rounding (G - (S - L) for L). Adam with a tiny eps
# turns a rounding difference in a gradient element near zero into a full +-lr step; a large
# eps keeps every update proportional to its gradient, so the comparisons measure the rule.
OPTIMIZER = {"name": "adamw", "lr": 2e-2, "eps": 0.1, "weight_decay": 0.0}

# A round every two steps: of the whole vector (H = 2), or of half of it (H = 4, two
# fragments), whose checkpoints hold G and, apart, the progress of the fragment synced less
# recently.
WHOLE_OR_FRAGMENTS = pytest.mark.parametrize("streaming", [
    {"local_steps": 2}, {"local_steps": 4, "fragments": 2}], ids=["whole", "fragments"])


def test_overlap_is_a_local_steps_setting() -> None:
    base = 'name = "o"\n[model]\nbase = "m"\n'
    assert loads(base).sync.overlapped
    assert loads(base + "[sync]\noverlap = true\n").sync.overlapped
    assert not loads(base + "[sync]\noverlap = false\n").sync.overlapped
    assert loads(base + "[sync]\nlocal_steps = 12\nfragments = 3\n").sync.overlapped
    assert not loads(base + '[sync]\nmode = "gradient"\n').sync.overlapped
    with pytest.raises(ConfigError, match=r"sync\.overlap: applies to local_steps mode only "
                                          r"\(gradient mode never overlaps\)"):
        loads(base + '[sync]\nmode = "gradient"\noverlap = true\n')


@WHOLE_OR_FRAGMENTS
def test_a_lone_overlapping_peer_follows_its_inner_optimizer(
        tiny_sd1: Path, images: Path, tmp_path: Path, streaming: dict[str, int]) -> None:
    trained: dict[str, torch.Tensor] = {}

    def run(work: str, **sync: object) -> list[torch.Tensor]:
        config = tiny_run(tiny_sd1, training={"max_steps": 6}, sync=sync,
                          optimizer=OPTIMIZER, checkpoint={"every_steps": 6})
        trainer = train(config, images, tmp_path / work)
        assert trainer.outer is not None
        if trainer.overlap is not None:
            assert trainer.overlap.in_flight is None, "the last checkpoint drained the round"
            flat = torch.cat([w.reshape(-1) for w in weights(trainer)])
            # A checkpoint holds G where the last round synced (the whole vector, or its
            # fragment: the other fragments hold their progress since their own last sync).
            a, b = fragments.round_span(config, 3, flat.numel())
            assert torch.equal(trainer.outer.start[a:b], flat[a:b]), "a checkpoint holds G"
            trained.update((name, p.detach().clone()) for name, p in trainer.c.trainable)
            trained["G"] = trainer.outer.start.clone()
        return weights(trainer)

    never_synced = run("never", local_steps=100, overlap=False)
    overlapped = run("overlap", overlap=True, **streaming)
    # Alone, each applied round sets G to where the round's local steps ended, and the
    # weights go on from G - (S - L) = L: the inner optimizer's path, to float rounding.
    gap = max(float((a - b).abs().max()) for a, b in zip(never_synced, overlapped, strict=True))
    assert gap <= 1e-6
    start = load_file(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    moved = max(float((trained["unet." + k] - v).abs().max()) for k, v in start.items())
    assert moved > 100 * gap, "the weights moved far more than the two paths differ"

    rounds = [json.loads(line) for line in (tmp_path / "overlap/sync_log.jsonl").open()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # Rounds 1 and 2 are applied at the next boundary; round 3 by the checkpoint at step 6.
    assert [r["global_step"] for r in rounds] == [4, 6, 6]
    assert all(r["waited"] >= 0 and r["launched"] <= r["finished"] for r in rounds)
    assert rounds[-1]["digest"] == vector_digest(trained["G"])


@WHOLE_OR_FRAGMENTS
def test_a_resumed_overlapping_peer_follows_an_uninterrupted_one(
        tiny_sd1: Path, images: Path, tmp_path: Path, streaming: dict[str, int]) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 6}, optimizer=OPTIMIZER,
                      sync={"overlap": True, **streaming},
                      checkpoint={"every_steps": 4})
    straight = train(config, images, tmp_path / "straight")
    # Stopped at step 3, with round 1 (launched at step 2) in flight: the stop drains it.
    train(config, images, tmp_path / "resumed", stop_at=3)
    resumed = train(config, images, tmp_path / "resumed")
    assert straight.outer is not None and resumed.outer is not None
    # The stop applied round 1 two steps early: the paths differ by float rounding only.
    assert torch.allclose(straight.outer.start, resumed.outer.start, rtol=0, atol=1e-6)
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    steps = [[json.loads(line)["global_step"] for line in (tmp_path / w / "sync_log.jsonl").open()]
             for w in ("straight", "resumed")]
    assert steps == [[4, 4, 6], [3, 4, 6]], "round 1 drained by the stop at step 3"
    checkpoint = tmp_path / "straight/checkpoints/step-00000004"
    saved = load_file(checkpoint / "trainable.safetensors")
    g = load_file(checkpoint / "outer.safetensors")["start"]
    flat = torch.cat([saved[name].reshape(-1) for name, _ in straight.c.trainable])
    # The checkpoint's weights are the swarm's G (what a joiner compares across peers).
    assert torch.equal(flat, g)
    assert (checkpoint / "local.safetensors").exists() == ("fragments" in streaming)


def test_a_streaming_round_weighs_the_samples_behind_its_fragments_delta(
        tiny_sd1: Path, images: Path, tmp_path: Path) -> None:
    # H = 4 with two fragments: a round every 2 steps, each fragment's delta covering the 4
    # steps since its own last sync (only 2 for the very first round).
    config = tiny_run(tiny_sd1, training={"max_steps": 8, "batch_size": 2},
                      optimizer=OPTIMIZER, sync={"local_steps": 4, "overlap": True,
                                                 "fragments": 2},
                      checkpoint={"every_steps": 8})
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    link = RecordingLink(toml)
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / "w", export=False,
                                            device="cpu"), link)
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    assert link.weights == [4, 8, 8, 8]
