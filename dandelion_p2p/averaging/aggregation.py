"""Combine the contributions to one span-chunk: weighted mean, or centered clipping.

Both take the same input (one ``Contribution`` per sender: its decoded values and its weight,
the number of samples behind them) and give the same output: the aggregate plus one
``ContributorReport`` per sender, which the caller turns into score-book events.

A contribution that holds NaN or infinity, or whose weight is not a finite positive number, is
excluded and reported; it never reaches the arithmetic. Excluding costs the honest majority
nothing, while a single NaN averaged in would destroy the whole chunk for everyone.

Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021) starts from a robust centre ``v`` and repeats::

    v <- v + sum_i w_i * clip(x_i - v, tau) / sum_i w_i,   clip(d, tau) = d * min(1, tau / |d|)

(``|.|`` the L2 norm over the chunk). However large a contribution is, it moves ``v`` by at most
``tau * w_i / sum w`` per iteration, while contributions within ``tau`` of ``v`` act as in a
plain weighted mean. Unless given, ``v`` starts at the coordinate-wise median and ``tau`` is
the median distance of the contributions to that start: about the spread of honest peers as
long as they are the majority.

Clipping bounds a far contribution but does not remove it: each iteration it still pulls ``v``
by ``tau * w_i / sum w`` towards itself, and with small-batch gradients ``tau`` (the honest
spread) is as large as the signal, so a peer sending its gradient x -1000 turns the result
against the honest mean. A contribution that ends more than ``outlier_ratio * tau`` from
``v`` is therefore left out and the clipping run again over the others, as long as such
contributions are fewer than half of the valid ones (otherwise there is no majority to trust,
and the clipped result stands).

The guarantee is about weight, not heads: a contribution moves ``v`` in proportion to its
share of the total weight, so a liar who announces most of the samples still wins. Announced
weights must be bounded before they get here (a run can cap samples per round).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.errors import DandelionError

FloatArray = NDArray[np.float32]

DEFAULT_ITERATIONS = 3
DEFAULT_OUTLIER_RATIO = 3.0


@dataclass(frozen=True, slots=True)
class Contribution:
    sender: bytes
    values: NDArray[Any]
    weight: float


class Exclusion(enum.Enum):
    """Why a contribution was left out of the aggregate."""

    NON_FINITE = "values hold NaN or infinity"
    BAD_WEIGHT = "weight is not a finite positive number"
    OUTLIER = "ended beyond outlier_ratio * tau from the others (centered clipping)"


@dataclass(frozen=True, slots=True)
class ContributorReport:
    """How one sender's contribution fared.

    ``distance`` is the L2 distance of its values from the aggregate (NaN when excluded).
    ``tau_ratio`` is ``distance / tau`` under centered clipping (None for the plain mean):
    above 1 the contribution was pulled on with a clipped force. ``outlier`` is set when that
    ratio exceeds the call's ``outlier_ratio``: a peer worth penalising. An outlier left out of
    the aggregate has ``excluded`` ``Exclusion.OUTLIER`` and ``outlier`` set, its distance and
    ratio measured from the aggregate of the others.
    """

    sender: bytes
    excluded: Exclusion | None
    distance: float
    tau_ratio: float | None
    outlier: bool

    @property
    def included(self) -> bool:
        return self.excluded is None


@dataclass(frozen=True, slots=True)
class Aggregate:
    values: FloatArray
    total_weight: float
    reports: tuple[ContributorReport, ...]
    tau: float | None = None

    @property
    def included(self) -> tuple[bytes, ...]:
        return tuple(r.sender for r in self.reports if r.included)


class NothingToAggregate(DandelionError):
    """Every contribution to the chunk was excluded (or there was none)."""

    def __init__(self, reports: tuple[ContributorReport, ...]) -> None:
        self.reports = reports
        super().__init__(f"no valid contribution among {len(reports)}")


def weighted_mean(contributions: Sequence[Contribution]) -> Aggregate:
    """The weighted mean of the valid contributions, accumulated in float64.

    Each element is the float32 rounding of the exact weighted mean up to float64 summation
    error: within 1e-6 relative for any input that does not cancel to near zero.

    Raises ``NothingToAggregate`` when no contribution is valid, and ``ValueError`` for
    duplicate senders or values of different lengths (local bugs: the caller decoded them).
    """
    xs, weights, reports = _screen(contributions)
    n = xs[0].size
    shares = _shares(weights)
    values = np.empty(n, dtype=np.float32)
    squares = np.zeros(len(xs))
    acc = np.empty(min(n, _BLOCK))
    scratch = np.empty_like(acc)
    for sl in _blocks(n):
        a, d = acc[: sl.stop - sl.start], scratch[: sl.stop - sl.start]
        a.fill(0.0)
        for x, share in zip(xs, shares, strict=True):
            np.multiply(x[sl], share, out=d)
            a += d
        values[sl] = a
        _add_squared_distances(xs, sl, a, d, squares)
    distances = iter(np.sqrt(squares).tolist())
    finished = tuple(
        r if r.excluded else ContributorReport(r.sender, None, next(distances), None, False)
        for r in reports
    )
    return Aggregate(values, math.fsum(weights), finished)


def centered_clip(
    contributions: Sequence[Contribution],
    *,
    tau: float | None = None,
    center: NDArray[Any] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    outlier_ratio: float = DEFAULT_OUTLIER_RATIO,
    exclude_outliers: bool = True,
) -> Aggregate:
    """Centered clipping of the valid contributions (see the module docstring).

    ``center`` is where to start (e.g. the previous round's result), else the coordinate-wise
    median; ``tau`` the clipping radius, else the median distance of the contributions to the
    start. With ``tau = 0`` the result stays at the start.

    With ``exclude_outliers`` (the default), contributions that end more than
    ``outlier_ratio * tau`` from the result are left out and the clipping runs once more over
    the others (from their own median and radius, unless ``center``/``tau`` are given), as long
    as they are fewer than half of the valid contributions. Clipping alone only bounds such a
    contribution: it still pulls the result ``share * tau`` towards itself per iteration, which
    for noisy small-batch gradients is as large as the honest signal. Their reports say
    ``Exclusion.OUTLIER`` (still ``outlier``, so the caller scores them).

    Raises ``NothingToAggregate`` when no contribution is valid, and ``ValueError`` for
    duplicate senders, values of different lengths, or an invalid ``tau``/``center``/
    ``iterations``.
    """
    if tau is not None and not (math.isfinite(tau) and tau >= 0.0):
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    xs, weights, reports = _screen(contributions)
    v, used_tau, squares = _clip(xs, weights, tau, center, iterations)
    far: set[int] = set(np.flatnonzero(np.sqrt(squares) > outlier_ratio * used_tau).tolist())
    if exclude_outliers and far and 2 * len(far) < len(xs):
        keep = [i for i in range(len(xs)) if i not in far]
        v, used_tau, _ = _clip([xs[i] for i in keep], weights[keep], tau, center, iterations)
        squares = np.zeros(len(xs))
        diff = np.empty(min(xs[0].size, _BLOCK))
        for sl in _blocks(xs[0].size):
            _add_squared_distances(xs, sl, v[sl], diff[: sl.stop - sl.start], squares)
        weights = weights[keep]
    else:
        far = set()

    finished = []
    valid = iter(enumerate(np.sqrt(squares).tolist()))
    for r in reports:
        if r.excluded:
            finished.append(r)
            continue
        i, dist = next(valid)
        ratio = dist / used_tau if used_tau > 0 else (math.inf if dist > 0 else 0.0)
        if i in far:
            finished.append(ContributorReport(r.sender, Exclusion.OUTLIER, dist, ratio, True))
        else:
            finished.append(ContributorReport(r.sender, None, dist, ratio, ratio > outlier_ratio))
    return Aggregate(v.astype(np.float32), math.fsum(weights), tuple(finished), used_tau)


def _clip(
    xs: Sequence[FloatArray],
    weights: NDArray[np.float64],
    tau: float | None,
    center: NDArray[Any] | None,
    iterations: int,
) -> tuple[NDArray[np.float64], float, NDArray[np.float64]]:
    """The clipping iterations: (result in float64, tau used, squared distances to it)."""
    n = xs[0].size
    if center is None:
        v = coordinate_median(xs).astype(np.float64)
    else:
        v = np.array(center, dtype=np.float64).reshape(-1)
        if v.size != n or not np.isfinite(v).all():
            raise ValueError(f"center must be {n} finite values")

    # float64 so that no difference of finite float32 values, nor its squared norm, overflows.
    # Work goes block by block so each block of v stays in cache while every contribution
    # passes over it; the squared distances for the next iteration are gathered in the same
    # sweep that applies this one's step.
    diff = np.empty(min(n, _BLOCK))
    step = np.empty_like(diff)
    squares = np.zeros(len(xs))
    for sl in _blocks(n):
        _add_squared_distances(xs, sl, v[sl], diff[: sl.stop - sl.start], squares)
    if tau is None:
        tau = float(np.median(np.sqrt(squares)))
    shares = _shares(weights)
    for _ in range(iterations):
        distances = np.sqrt(squares)
        pulls = shares * np.minimum(1.0, tau / np.maximum(distances, np.finfo(float).tiny))
        squares = np.zeros(len(xs))
        for sl in _blocks(n):
            vb, d, s = v[sl], diff[: sl.stop - sl.start], step[: sl.stop - sl.start]
            s.fill(0.0)
            for x, pull in zip(xs, pulls, strict=True):
                np.subtract(x[sl], vb, out=d)
                d *= pull
                s += d
            vb += s
            _add_squared_distances(xs, sl, vb, d, squares)
    return v, tau, squares


def coordinate_median(xs: Sequence[FloatArray]) -> FloatArray:
    """The element-wise median of equally long float32 vectors (mean of the middle two for an
    even count).

    Up to ``_NETWORK_MAX`` inputs it runs a sorting network of element-wise min/max over
    cache-sized blocks: several times faster than ``np.median`` along an axis for the few
    peers of one group.
    """
    k, n = len(xs), xs[0].size
    if k > _NETWORK_MAX:
        return np.median(np.stack(xs), axis=0).astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    rows = np.empty((k, min(n, _BLOCK)), dtype=np.float32)
    low = np.empty(rows.shape[1], dtype=np.float32)
    network = _sorting_network(k)
    for sl in _blocks(n):
        m = sl.stop - sl.start
        r, lo = rows[:, :m], low[:m]
        for i, x in enumerate(xs):
            r[i] = x[sl]
        for i, j in network:
            np.minimum(r[i], r[j], out=lo)
            np.maximum(r[i], r[j], out=r[j])
            r[i] = lo
        if k % 2:
            out[sl] = r[k // 2]
        else:
            np.add(r[k // 2 - 1] / np.float32(2), r[k // 2] / np.float32(2), out=out[sl])
    return out


_NETWORK_MAX = 32
_BLOCK = 1 << 15


def _shares(weights: NDArray[np.float64]) -> NDArray[np.float64]:
    # Scaled to the largest first, so the sum stays finite whatever peers announce.
    scaled = weights / weights.max()
    shares: NDArray[np.float64] = scaled / scaled.sum()
    return shares


def _blocks(n: int) -> list[slice]:
    return [slice(i, min(i + _BLOCK, n)) for i in range(0, n, _BLOCK)]


def _add_squared_distances(
    xs: Sequence[FloatArray],
    sl: slice,
    center: NDArray[np.float64],
    scratch: NDArray[np.float64],
    squares: NDArray[np.float64],
) -> None:
    # Squared and summed in numpy rather than with np.dot: BLAS may wake its thread pool for a
    # dot product, which on a busy machine costs far more than the arithmetic.
    for i, x in enumerate(xs):
        np.subtract(x[sl], center, out=scratch)
        np.square(scratch, out=scratch)
        squares[i] += scratch.sum()


@functools.cache
def _sorting_network(k: int) -> tuple[tuple[int, int], ...]:
    """Comparators of Batcher's odd-even merge sort for ``k`` inputs, each ``(i, j)`` with
    ``i < j`` meaning: put the smaller at ``i``. Comparators that would reach past ``k`` are
    left out, as if the missing inputs were +infinity."""
    pairs = []
    p = 1
    while p < k:
        q = p
        while q >= 1:
            for j in range(q % p, k - q, 2 * q):
                for i in range(min(q, k - j - q)):
                    if (i + j) // (2 * p) == (i + j + q) // (2 * p):
                        pairs.append((i + j, i + j + q))
            q //= 2
        p *= 2
    return tuple(pairs)


def _screen(
    contributions: Sequence[Contribution],
) -> tuple[list[FloatArray], NDArray[np.float64], tuple[ContributorReport, ...]]:
    """Valid values and their weights, and a report per contribution."""
    senders = [c.sender for c in contributions]
    if len(set(senders)) != len(senders):
        raise ValueError("duplicate sender among contributions")
    sizes = {np.size(c.values) for c in contributions}
    if len(sizes) > 1:
        raise ValueError(f"contributions differ in size: {sorted(sizes)}")
    xs: list[FloatArray] = []
    weights: list[float] = []
    reports: list[ContributorReport] = []
    for c in contributions:
        x = np.ascontiguousarray(c.values, dtype=np.float32).reshape(-1)
        weight = float(c.weight)
        excluded = None
        if not (math.isfinite(weight) and weight > 0.0):
            excluded = Exclusion.BAD_WEIGHT
        elif x.size and not (math.isfinite(float(x.min())) and math.isfinite(float(x.max()))):
            # min and max propagate NaN: a finiteness check without a mask temporary.
            excluded = Exclusion.NON_FINITE
        else:
            xs.append(x)
            weights.append(weight)
        reports.append(ContributorReport(c.sender, excluded, math.nan, None, False))
    if not xs:
        raise NothingToAggregate(tuple(reports))
    return xs, np.array(weights), tuple(reports)
