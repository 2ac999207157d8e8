"""Throughput of the averaging codecs and aggregators.

Run: .venv/bin/python benchmarks/codec_throughput.py [MiB]
MB/s are of float32 input (what the caller hands over), median of several runs; the error is
the relative L2 error of one encoding of gaussian data.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from dandelion_p2p.averaging.aggregation import Contribution, centered_clip, weighted_mean
from dandelion_p2p.averaging.compression import CODECS


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    x = np.random.default_rng(0).standard_normal(mib * 2**18).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{mib} MiB float32 ({x.size:,} elements)")
    for name, codec in CODECS.items():
        data = codec.encode(x)
        enc = median_seconds(partial(codec.encode, x))
        dec = median_seconds(partial(codec.decode, data, x.size))
        ratio = len(data) / x.nbytes
        error = np.linalg.norm(codec.decode(data, x.size) - x) / np.linalg.norm(x)
        print(
            f"  {name:5s} size x{ratio:.3f} ({32 * ratio:6.3f} bits a value)"
            f"  encode {mb / enc:7.0f} MB/s  decode {mb / dec:7.0f} MB/s  error {error:.2e}"
        )

    rng = np.random.default_rng(1)
    n = 2**20
    for k in (4, 8, 16):
        cs = [
            Contribution(bytes([i]), rng.standard_normal(n).astype(np.float32), 1.0)
            for i in range(k)
        ]
        total = k * n * 4 / 1e6
        mean = median_seconds(partial(weighted_mean, cs), 3)
        clip = median_seconds(partial(centered_clip, cs), 3)
        print(
            f"  {k:2d} x 4 MiB contributions: weighted_mean {total / mean:6.0f} MB/s"
            f"  centered_clip {total / clip:6.0f} MB/s"
        )


if __name__ == "__main__":
    main()
