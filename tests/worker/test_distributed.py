"""A peer on several devices: two gloo ranks on the CPU train as one peer, as one process
training their combined batch would, and the swarm hears one weight, the samples of both."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.checkpoint import CheckpointStore
from dandelion_p2p.worker.distributed import run_ranks
from dandelion_p2p.worker.feeds import Batch, Feed, FolderFeed, Position
from dandelion_p2p.worker.link import SoloLink, SyncOutcome
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run


class RecordingLink(SoloLink):
    """Training alone, with the weight of every sync kept."""

    def __init__(self, run_config: Path) -> None:
        super().__init__(run_config)
        self.weights: list[float] = []

    def sync(self, round_: int, weight: float, kind: str, *,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        self.weights.append(weight)
        return super().sync(round_, weight, kind)


class SplitFirstLink(RecordingLink):
    """Its first round split: two members, nothing averaged (gradient mode carries the
    step's gradient to the next)."""

    def sync(self, round_: int, weight: float, kind: str, *,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        outcome = super().sync(round_, weight, kind)
        return SyncOutcome(round_, False, 0.0, 2, 0.0) if len(self.weights) == 1 else outcome


class BothShards:
    """The batches the two ranks train, as one batch per step."""

    def __init__(self, feeds: list[FolderFeed]) -> None:
        self.feeds = feeds

    def next_batch(self, position: Position) -> Batch:
        # Each rank walks its shard with a position of its own, equal to the others'.
        others = [feed.next_batch(copy.deepcopy(position)) for feed in self.feeds[1:]]
        first = self.feeds[0].next_batch(position)
        assert all(b.bucket == first.bucket for b in others)
        return Batch(first.bucket, first.samples + sum((b.samples for b in others), ()))

    def batch_trained(self, position: Position) -> None:
        self.feeds[0].batch_trained(position)

    def describe(self) -> str:
        return "both shards"


class CombinedBatchTrainer(Trainer):
    def _make_feed(self, buckets: list[tuple[int, int]], peer: str) -> Feed:
        import blake3

        t, data = self.config.training, self.options.data
        assert data is not None
        order = [t.seed, int(blake3.blake3(peer.encode()).hexdigest()[:8], 16)]
        return BothShards([
            FolderFeed(data, buckets, t.batch_size, order, (rank, 2),
                       scan_cache=self.options.work_dir / "cache" / f"scan-{rank}.sqlite",
                       config=self.config)
            for rank in range(2)])


def _config(tiny_sd1: Path, mode: str = "local_steps", steps: int = 2) -> RunConfig:
    # One bucket: the two ranks' batches join into one batch of the single process.
    sync: dict[str, object] = ({"local_steps": 1} if mode == "local_steps"
                               else {"mode": "gradient", "target_batch": 4})
    return tiny_run(tiny_sd1, training={"max_steps": steps, "bucketing": False}, sync=sync,
                    checkpoint={"every_steps": 1})


def _trained(work: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointStore(work / "checkpoints", keep_last=2).latest()
    assert latest is not None
    return latest.tensors("trainable")


@pytest.mark.parametrize(("mode", "link_type", "weights"), [
    ("local_steps", RecordingLink, [4, 4]),
    pytest.param("gradient", RecordingLink, [4, 4], marks=pytest.mark.slow),
    # The split round's samples go again with the next rounds, counted once.
    pytest.param("gradient", SplitFirstLink, [4, 8, 12], marks=pytest.mark.slow),
])
def test_two_ranks_train_as_one_peer_with_their_combined_batch(
        tiny_sd1: Path, images: Path, tmp_path: Path, mode: str, link_type: type[RecordingLink],
        weights: list[int]) -> None:
    config = _config(tiny_sd1, mode, steps=len(weights))
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    link = link_type(toml)
    options = WorkerOptions(data=images, work_dir=tmp_path / "peer", export=False,
                            device="cpu", gradient_checkpointing=False)
    leader = run_ranks(2, link, options)
    assert leader.position.global_step == len(weights)

    # Both ranks hold the same weights, bit for bit.
    rank0 = {name: p.detach() for name, p in leader.c.trainable}
    rank1 = _trained(tmp_path / "peer" / "ranks" / "rank-1")
    assert rank0.keys() == rank1.keys()
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name

    # The swarm heard one peer with the samples of both ranks: two per rank and step.
    assert link.weights == weights

    # One process training each step's two rank batches as one batch gets there too.
    single_link = link_type(toml)
    single = CombinedBatchTrainer(
        config, WorkerOptions(data=images, work_dir=tmp_path / "single", export=False,
                              device="cpu", gradient_checkpointing=False), single_link)
    single.resume()
    try:
        single.run()
    finally:
        single.close()
    start = {name: p.detach() for name, p in CombinedBatchTrainer(
        config, WorkerOptions(data=images, work_dir=tmp_path / "start", export=False,
                              device="cpu", stop_at=0), SoloLink(toml)).c.trainable}
    moved = False
    for name, param in single.c.trainable:
        torch.testing.assert_close(rank0[name], param.detach(), rtol=1e-4, atol=1e-6)
        moved = moved or not torch.equal(start[name], param.detach())
    assert moved, "training changed the weights"
    assert single_link.weights == weights


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
def test_two_gpus_train_as_one_peer(tiny_sd1: Path, images: Path, tmp_path: Path) -> None:
    config = _config(tiny_sd1)
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    link = RecordingLink(toml)
    leader = run_ranks(2, link, WorkerOptions(data=images, work_dir=tmp_path / "peer",
                                              export=False, device="cuda",
                                              mixed_precision="no"))
    rank1 = _trained(tmp_path / "peer" / "ranks" / "rank-1")
    for name, param in leader.c.trainable:
        assert torch.equal(param.detach().cpu(), rank1[name].cpu()), name
    assert link.weights == [4, 4]


# 17 s; training on two ranks as one peer is checked by default by the test above.
@pytest.mark.slow
def test_the_local_setting_devices_is_what_a_started_worker_uses(
        tiny_sd1: Path, images: Path, tmp_path: Path) -> None:
    """A worker started without --devices (as the daemon starts it) trains on as many
    devices as the machine's local settings say; a bad value is refused by name."""
    from dandelion_p2p.errors import ConfigError
    from dandelion_p2p.local_settings import LocalSettings, save_local_settings
    from dandelion_p2p.worker.cli import run_worker

    with pytest.raises(ConfigError, match="devices"):
        LocalSettings(devices=0)
    data_dir = tmp_path / "data"
    save_local_settings(data_dir, LocalSettings(devices=2, device="cpu"))
    run_config = tmp_path / "run.toml"
    run_config.write_text(_config(tiny_sd1, steps=1).to_toml())
    work = tmp_path / "work"
    assert run_worker(socket_path=None, data_dir=data_dir, run_config=run_config, data=images,
                      work_dir=work, shard=None, stop_at=0, device=None, export=False) == 0
    assert (work / "ranks" / "rank-1").is_dir(), "the second rank never ran"
    assert CheckpointStore(work / "checkpoints", keep_last=2).latest() is not None
