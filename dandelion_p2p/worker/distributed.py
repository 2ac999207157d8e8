"""Several devices in one peer: data parallel among the processes (ranks) of one machine.

    dandelion-p2p worker --devices 2 --data images/ ...

Rank 0 is the worker process itself; it starts ranks 1..N-1 and is the only one that talks to
the daemon (``RankLink``): syncs, progress, catch-up, exports. Each rank trains its own share of
the peer's data; after every step's backward pass the ranks sum their gradients and sample
counts (``PeerGroup.reduce_gradients``), so every rank takes the same optimizer step as one
process training the combined batch would, and the ranks stay bit-identical. What the swarm
averages comes back from rank 0 by broadcast; the swarm sees one peer whose weight is the
samples of all its ranks. NCCL among CUDA devices, gloo on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig, loads
from dandelion_p2p.runconfig.timeline import ConfigTimeline
from dandelion_p2p.worker.feeds import Feed, FolderFeed
from dandelion_p2p.worker.link import Link, SyncOutcome
from dandelion_p2p.worker.peer_group import PeerGroup
from dandelion_p2p.worker.progress import ConsoleProgress
from dandelion_p2p.worker.protocol import ConfigVersion
from dandelion_p2p.worker.train import Trainer, WorkerOptions, run_until_stopped

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class RankLink:
    """Rank 0 passes everything to the real link and hands the results to the other ranks;
    the other ranks have no daemon and take what rank 0 shares, at the same calls."""

    def __init__(self, group: PeerGroup, inner: Link | None, leader_checkpoints: Path) -> None:
        self.group, self.inner = group, inner
        self.leader_checkpoints = leader_checkpoints
        self._buffer: np.ndarray | None = None
        self.run_configs: ConfigTimeline[ConfigVersion] = (
            inner.run_configs if inner is not None else ConfigTimeline())
        run, toml = group.share((inner.run, inner.run_config_toml) if inner is not None
                                else None)
        self.run, self.run_config_toml = run, toml
        self._share_configs()

    def _share_configs(self) -> None:
        known = self.group.share([(v.version, v.effective_step, v.toml)
                                  for v in self.run_configs] if self.inner is not None else None)
        if self.inner is None:
            for version, step, toml in known:
                if self.run_configs.get(version) is None:
                    self.run_configs.add(ConfigVersion(version, step, toml, loads(toml)))

    def round_config(self, version: int, first_step: int) -> None:
        if self.inner is not None:
            self.inner.round_config(version, first_step)

    def buffer(self, elements: int) -> np.ndarray:
        self._buffer = (self.inner.buffer(elements) if self.inner is not None
                        else np.zeros(elements, dtype=np.float32))
        return self._buffer

    def sync(self, round_: int, weight: float, kind: str, *,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        # ``weight`` is already the whole peer's: the ranks summed their samples each step.
        outcome = (self.inner.sync(round_, weight, kind, span=span) if self.inner is not None
                   else None)
        assert self._buffer is not None
        start, stop = span if span is not None else (0, self._buffer.size)
        self.group.broadcast_(torch.from_numpy(self._buffer[start:stop]))
        outcome = self.group.share(outcome)
        self._share_configs()
        return outcome  # type: ignore[no-any-return]

    def progress(self, fields: dict[str, Any], force: bool = False) -> bool:
        stop = self.inner.progress(fields, force) if self.inner is not None else False
        self._share_configs()
        return stop

    def catch_up(self, have_step: int, checkpoints: Path, wait: bool = False,
                 leave_out: Sequence[str] = ()) -> int:
        got = (self.inner.catch_up(have_step, checkpoints, wait, leave_out)
               if self.inner is not None else -1)
        got = int(self.group.share(got))
        if self.inner is None and got > have_step:
            name = f"step-{got:08d}"
            target = Path(checkpoints) / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.leader_checkpoints / name, target)
        self._share_configs()
        return got

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


class RankTrainer(Trainer):
    """A ``Trainer`` that is one rank of a peer. A stop (a signal, the daemon) takes effect
    only where rank 0 shares it, at a progress report, so that all ranks leave the loop at
    the same step."""

    def __init__(self, config: RunConfig, options: WorkerOptions, link: RankLink,
                 peer: str, group: PeerGroup) -> None:
        self.group = self.peer_group = group
        super().__init__(config, options, link, peer=peer)
        if not group.leader:
            # Rank 0 speaks for the peer: one console bar. (The others keep their logs, and
            # the sample images of the same weights, in their own folders.)
            self.reports.console.close()
            self.reports.console = ConsoleProgress(self.last_step(), enabled=False)

    @property  # type: ignore[override]
    def stop_requested(self) -> bool:
        return getattr(self, "_agreed_stop", False)

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self._wanted_stop = value

    def report(self, state: str, force: bool = False) -> None:
        super().report(state, force)
        self._agreed_stop = bool(self.group.share(getattr(self, "_wanted_stop", False)))

    def train_step(self) -> tuple[float, int]:
        result = super().train_step()
        if self.carried and not self.group.leader:
            # A split round left the peer's summed gradient in every rank; rank 0's copy
            # alone goes into the next step's sum.
            for param in self.params:
                if param.grad is not None:
                    param.grad.zero_()
        return result

    def _make_feed(self, buckets: list[tuple[int, int]], peer: str) -> Feed:
        t, options = self.config.training, self.options
        if options.data is None:
            raise ConfigError("several devices in one peer train from a local folder: give "
                              "--data")
        index, count = options.shard or (0, 1)
        order = ([t.seed] if options.shard is not None
                 else [t.seed, int(blake3.blake3(peer.encode()).hexdigest()[:8], 16)])
        # Rank r takes every world-th sample of the peer's share (the peer's own order).
        shard = (index + count * self.group.rank, count * self.group.world)
        return FolderFeed(options.data, buckets, t.batch_size, order, shard,
                          scan_cache=options.work_dir / "cache" / "scan.sqlite",
                          follow_symlinks=options.follow_symlinks, config=self.config)

    def local_target(self) -> int:
        if self.outer is not None:
            return super().local_target()
        return max(1, math.ceil(super().local_target() / self.group.world))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join_group(rank: int, world: int, port: int, device: str) -> PeerGroup:
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if torch.cuda.device_count() < world:
            raise ConfigError(f"{world} devices asked for, torch sees "
                              f"{torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(rank)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return PeerGroup(rank, world, torch.device("cuda", rank) if cuda else torch.device("cpu"))


def rank_options(options: WorkerOptions, rank: int) -> WorkerOptions:
    """Rank 0 keeps the worker's folder; the others keep their caches and checkpoints apart
    in it and export nothing."""
    if rank == 0:
        return options
    return replace(options, work_dir=options.work_dir / "ranks" / f"rank-{rank}", export=False)


def _follower(rank: int, world: int, port: int, options: WorkerOptions, peer: str) -> None:
    # The leader decides when the peer stops and shares it; a signal here would leave the
    # ranks at different steps.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        # A leader killed outright (kill -9) takes its ranks with it, rather than leaving
        # them waiting in a collective until the backend's timeout.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    group = _join_group(rank, world, port, options.device)
    try:
        link = RankLink(group, None, options.work_dir / "checkpoints")
        trainer = RankTrainer(loads(link.run_config_toml), rank_options(options, rank), link,
                              peer, group)
        trainer.resume()
        try:
            trainer.run()
        finally:
            trainer.close()
    finally:
        dist.destroy_process_group()


def run_ranks(devices: int, link: Link, options: WorkerOptions, peer: str = "") -> Trainer:
    """Train as one peer on ``devices`` ranks: start ranks 1.., be rank 0 here. Returns rank
    0's trainer after its run; raises if a rank failed."""
    port = free_port()
    context = mp.get_context("spawn")
    followers = [context.Process(target=_follower, args=(rank, devices, port, options, peer),
                                 daemon=True, name=f"dandelion-rank-{rank}")
                 for rank in range(1, devices)]
    for process in followers:
        process.start()
    group = _join_group(0, devices, port, options.device)
    trainer: RankTrainer | None = None
    finished = False
    try:
        rank_link = RankLink(group, link, options.work_dir / "checkpoints")
        trainer = RankTrainer(loads(rank_link.run_config_toml), options, rank_link, peer, group)
        trainer.resume()
        run_until_stopped(trainer)
        finished = True
    finally:
        for process in followers:
            # After a failure here the others may wait in a collective that never comes.
            process.join(timeout=None if finished else 5)
            if process.is_alive():
                process.terminate()
        dist.destroy_process_group()
    failed = [p.name for p in followers if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"ranks failed: {', '.join(failed)}")
    assert trainer is not None
    return trainer


