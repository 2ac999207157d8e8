"""Aspect-ratio bucketing and the order of batches, with no image dropped.

Each image goes to the bucket whose aspect ratio is closest to its own (no bucket larger in
area than ``resolution``²). Every epoch is a seeded permutation of all samples; a peer takes
its share (``shard_index::shard_count``) of it, groups its share by bucket and cuts each group
into batches; the last, smaller batch of a bucket is trained too rather than thrown away.
The order depends only on (seed, epoch, shard), so a resumed worker continues exactly where it
stopped, and the shares of n peers batch for batch make up what one peer with n times the
batch would see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Bucket = tuple[int, int]
"""(width, height) in pixels."""


def make_buckets(resolution: int, smallest: int, largest: int, step: int) -> list[Bucket]:
    """Every (w, h), multiples of ``step`` within [smallest, largest], no larger in area than
    ``resolution``², and for each width the tallest such height (kohya's scheme)."""
    area = resolution * resolution
    buckets: set[Bucket] = {(resolution, resolution)}
    width = smallest
    while width <= largest:
        height = min(largest, (area // width) // step * step)
        if height >= smallest:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(b for b in buckets if smallest <= min(b) and max(b) <= largest)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True, slots=True)
class BatchPlan:
    bucket: Bucket
    indices: tuple[int, ...]
    """Indices into the sample list."""


def plan_epoch(
    sample_buckets: Sequence[Bucket],
    batch_size: int,
    seed: int,
    epoch: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[BatchPlan]:
    """This peer's batches for ``epoch``, in training order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sample_buckets))
    mine = order[shard_index::shard_count]
    groups: dict[Bucket, list[int]] = {}
    for index in mine:
        groups.setdefault(sample_buckets[int(index)], []).append(int(index))
    batches = [
        BatchPlan(bucket, tuple(members[i : i + batch_size]))
        for bucket, members in sorted(groups.items())
        for i in range(0, len(members), batch_size)
    ]
    if len(groups) > 1:
        shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[int(i)] for i in shuffle]
    return batches
