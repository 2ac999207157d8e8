"""Where the trainer's batches come from: a local folder, or chunks leased from the run's
dataset servers through the daemon.

Both hand out :class:`Batch` es, whole bucketed batches of samples, and keep their place in
the trainer's :class:`Position` so that a checkpoint resumes the data where it stopped.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dandelion_p2p.control.protocol import CommandFailed
from dandelion_p2p.errors import ConfigError, DandelionError, PeerUnavailable
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.bucketing import BatchPlan, Bucket, nearest_bucket, plan_epoch
from dandelion_p2p.worker.data import Sample, scan, scan_shard
from dandelion_p2p.worker.kohya_dataset import assign_subsets, epoch_entries, subset_table

log = logging.getLogger(__name__)

LEASE_WAIT = 10.0
"""Seconds one lease request waits for a free chunk before the trainer checks for a stop."""
RETRY_DELAY = 5.0
FETCH_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Batch:
    bucket: Bucket
    samples: tuple[Sample, ...]

    def split(self, size: int) -> list[Batch]:
        return [Batch(self.bucket, self.samples[i : i + size])
                for i in range(0, len(self.samples), size)]


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    batches_done: int = 0
    rounds: int = 0
    samples_since_sync: int = 0
    expected_peers: int = 1
    chunk: str = ""
    """Leased data: the chunk being trained, its lease, and how many of its batches are done."""
    lease_id: int = -1
    batch_in_chunk: int = 0
    chunks_done: int = 0


class StopWaiting(Exception):
    """The trainer was asked to stop while it waited for data."""


class Feed(Protocol):
    def next_batch(self, position: Position) -> Batch: ...

    def batch_trained(self, position: Position) -> None: ...

    def describe(self) -> str: ...


def _plans(samples: Sequence[Sample], buckets: Sequence[Bucket], batch_size: int,
           seed: int, epoch: int, shard: tuple[int, int]) -> list[BatchPlan]:
    sample_buckets = [nearest_bucket(s.width, s.height, buckets) for s in samples]
    return plan_epoch(sample_buckets, batch_size, seed, epoch, *shard)


class FolderFeed:
    """Every image of a local folder, once per epoch, in a seeded order (``bucketing.py``).

    ``scan_cache``: the file that keeps the folder scan's hashes for the next start
    (``scan_cache.py``); ``follow_symlinks``: also train on files that symlinks lead to
    outside the folder. With ``config``, the folders directly under ``root`` are subsets
    (``kohya_dataset.py``): an epoch draws each image its subset's ``repeats`` times.
    """

    def __init__(self, root: Path, buckets: Sequence[Bucket], batch_size: int,
                 order_seed: Sequence[int], shard: tuple[int, int], *,
                 scan_cache: Path | None = None, follow_symlinks: bool = False,
                 config: RunConfig | None = None) -> None:
        self.samples = scan(root, follow_symlinks=follow_symlinks,
                            cache_file=scan_cache).samples
        self.subset_folders = [""]
        self.entries = list(range(len(self.samples)))
        """Sample indices as an epoch draws them (repeats included)."""
        if config is not None:
            self.subset_folders, self.samples = assign_subsets(root, self.samples, config)
            self.entries = epoch_entries(self.samples,
                                         subset_table(self.subset_folders, config))
        self.buckets = buckets
        self.batch_size = batch_size
        self.seed = int(np.random.SeedSequence(list(order_seed)).generate_state(1)[0])
        self.shard = shard
        self._epoch: tuple[int, list[BatchPlan]] | None = None

    def next_batch(self, position: Position) -> Batch:
        p = position
        plans = self._plans(p.epoch)
        if p.batch_in_epoch >= len(plans):
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            plans = self._plans(p.epoch)
        p.batch_in_epoch += 1
        p.batches_done += 1
        plan = plans[p.batch_in_epoch - 1]
        return Batch(plan.bucket, tuple(self.samples[i] for i in plan.indices))

    def batch_trained(self, position: Position) -> None:
        pass

    def _plans(self, epoch: int) -> list[BatchPlan]:
        if self._epoch is None or self._epoch[0] != epoch:
            drawn = [self.samples[i] for i in self.entries]
            plans = [BatchPlan(plan.bucket, tuple(self.entries[i] for i in plan.indices))
                     for plan in _plans(drawn, self.buckets, self.batch_size, self.seed,
                                        epoch, self.shard)]
            if not plans:
                raise ConfigError(f"shard {self.shard[0]}/{self.shard[1]} holds no images")
            self._epoch = (epoch, plans)
        return self._epoch[1]

    def describe(self) -> str:
        if len(self.entries) == len(self.samples):
            return f"{len(self.samples)} images"
        return f"{len(self.samples)} images, {len(self.entries)} draws per epoch"


class ChunkLeases(Protocol):
    """What the daemon offers for leased data (``DaemonLink`` implements it)."""

    def lease_chunk(self, wait: float, resume: int | None = None) -> dict[str, Any] | None: ...

    def fetch_chunk(self, chunk: str, size: int) -> Path: ...

    def complete_chunk(self, lease_id: int, samples: int) -> dict[str, Any]: ...


@dataclass
class _Chunk:
    lease: dict[str, Any]
    path: Path
    samples: list[Sample] = field(default_factory=list)
    plans: list[BatchPlan] = field(default_factory=list)
    handed_in: bool = False


class LeasedFeed:
    """Chunks leased from the run's dataset servers, one at a time.

    Each chunk's batches come in a seeded order (seed and chunk hash), so a resumed worker
    that still holds its lease goes on with the same batches. The receipt goes to the server
    as soon as the chunk's last batch is trained, before any sync: a peer waiting in a round
    must not sit on a chunk that another peer needs to finish the epoch. For the same reason
    no second chunk is leased ahead. A lease lost with a crash is not handed in: the server
    grants the chunk again when the lease expires.
    """

    def __init__(self, daemon: ChunkLeases, work_dir: Path, buckets: Sequence[Bucket],
                 batch_size: int, seed: int, stop_requested: Callable[[], bool]) -> None:
        self.daemon = daemon
        self.folder = work_dir / "chunks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.buckets = buckets
        self.batch_size = batch_size
        self.seed = seed
        self.stop_requested = stop_requested
        self.current: _Chunk | None = None
        self.progress: dict[str, Any] = {}
        """The server's last count of the epoch: ``epoch``, ``completed``, ``total``."""
        self._resumed = False

    # ---- the trainer's side

    def next_batch(self, position: Position) -> Batch:
        p = position
        if not self._resumed:
            self._resumed = True
            self.current = self._resume(p)
        while self.current is None or p.batch_in_chunk >= len(self.current.plans):
            self.current = self._lease_next()
            p.chunk, p.lease_id = self.current.lease["chunk"], self.current.lease["lease_id"]
            p.batch_in_chunk = 0
            self._remove_other_chunks()
        chunk = self.current
        plan = chunk.plans[p.batch_in_chunk]
        p.batch_in_chunk += 1
        p.batches_done += 1
        return Batch(plan.bucket, tuple(chunk.samples[i] for i in plan.indices))

    def batch_trained(self, position: Position) -> None:
        """The last batch handed out has been trained: hand in a finished chunk's receipt."""
        chunk = self.current
        if chunk is None or chunk.handed_in or position.batch_in_chunk < len(chunk.plans):
            return
        chunk.handed_in = True
        try:
            ack = self.daemon.complete_chunk(chunk.lease["lease_id"], len(chunk.samples))
        except (CommandFailed, PeerUnavailable) as exc:
            # E.g. the lease expired and another peer completed the chunk first: the training
            # happened and is kept; only the receipt is not counted.
            log.warning("receipt for chunk %s not taken: %s", chunk.lease["chunk"][:12], exc)
            return
        self.progress = ack
        position.chunks_done += 1

    def describe(self) -> str:
        parts = []
        if self.current is not None:
            parts.append(f"chunk {self.current.lease['chunk'][:12]} "
                         f"({len(self.current.samples)} images)")
        if self.progress:
            parts.append(f"epoch {self.progress['epoch']}: {self.progress['completed']}/"
                         f"{self.progress['total']} chunks done")
        return ", ".join(parts) or "waiting for a chunk lease"

    # ---- leases

    def _resume(self, p: Position) -> _Chunk | None:
        """A lease the daemon holds open from before a restart: the checkpoint's, at the
        checkpoint's batch, or another one (an earlier worker's, taken after its last
        checkpoint) from its start. Either way nothing is left to expire unused."""
        try:
            lease = self.daemon.lease_chunk(LEASE_WAIT, resume=p.lease_id)
            if lease is None:
                return None
            chunk = self._prepare(lease)
        except DandelionError as exc:
            log.warning("could not take up a held lease: %s", exc)
            return None
        if (lease["lease_id"], lease["chunk"]) == (p.lease_id, p.chunk):
            log.info("going on with chunk %s at batch %d of %d", p.chunk[:12],
                     p.batch_in_chunk, len(chunk.plans))
        else:
            p.chunk, p.lease_id, p.batch_in_chunk = lease["chunk"], lease["lease_id"], 0
        self.current = chunk
        # Trained to the end before the restart, its receipt not yet delivered: deliver it.
        self.batch_trained(p)
        return chunk

    def _lease_next(self) -> _Chunk:
        waited = False
        last_problem = ""
        while True:
            if self.stop_requested():
                raise StopWaiting()
            try:
                lease = self.daemon.lease_chunk(LEASE_WAIT)
            except DandelionError as exc:
                # Said once, not every few seconds while it lasts (no server found yet, say).
                if str(exc) != last_problem:
                    log.warning("no chunk to train on yet: %s; retrying every %g s", exc,
                                RETRY_DELAY)
                    last_problem = str(exc)
                self._pause(RETRY_DELAY)
                continue
            if lease is None:
                if not waited:
                    log.info("every chunk of the epoch is out with other peers; waiting")
                    waited = True
                continue
            for attempt in range(FETCH_ATTEMPTS):
                try:
                    return self._prepare(lease)
                except DandelionError as exc:
                    log.warning("chunk %s not fetched (attempt %d of %d): %s",
                                lease["chunk"][:12], attempt + 1, FETCH_ATTEMPTS, exc)
                    self._pause(RETRY_DELAY)
            # Given up: the lease expires on the server, which grants the chunk again.

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.stop_requested():
                raise StopWaiting()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    def _prepare(self, lease: dict[str, Any]) -> _Chunk:
        name = lease["chunk"]
        source = self.daemon.fetch_chunk(name, lease["size"])
        # A copy of our own: the daemon's cache may evict its file while we still train on it.
        path = self.folder / f"{name}.tar"
        if not path.exists():
            partial = path.with_suffix(".part")
            try:
                shutil.copyfile(source, partial)
            except OSError as exc:
                raise PeerUnavailable(f"cannot copy chunk {name[:12]}: {exc}") from None
            partial.replace(path)
        report = scan_shard(path)
        if not report.samples:
            raise ConfigError(f"chunk {name[:12]} holds no readable image")
        chunk = _Chunk(lease, path, report.samples)
        chunk.plans = _plans(chunk.samples, self.buckets, self.batch_size, self.seed,
                             int(name[:8], 16), (0, 1))
        log.info("leased chunk %s: %d images (lease %d, epoch %d)", name[:12],
                 len(chunk.samples), lease["lease_id"], lease["epoch"])
        return chunk

    def _remove_other_chunks(self) -> None:
        """Drop chunk files other than the current one."""
        keep = self.current.path if self.current is not None else None
        for path in self.folder.iterdir():
            if path != keep and path.suffix in (".tar", ".part"):
                path.unlink(missing_ok=True)
