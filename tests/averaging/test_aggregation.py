from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dandelion_p2p.averaging import aggregation
from dandelion_p2p.averaging.aggregation import (
    Contribution,
    Exclusion,
    NothingToAggregate,
    centered_clip,
    coordinate_median,
    weighted_mean,
)

N = 4096


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@st.composite
def contribution_sets(draw, max_size: int = 40):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(0, max_size))
    values = st.floats(-1e6, 1e6, width=32)
    arrays = [draw(hnp.arrays(np.float32, n, elements=values)) for _ in range(k)]
    weights = [draw(st.floats(1e-3, 1e6)) for _ in range(k)]
    pairs = zip(arrays, weights, strict=True)
    return [Contribution(bytes([i]), x, w) for i, (x, w) in enumerate(pairs)]


@settings(deadline=None)
@given(contribution_sets())
def test_weighted_mean_matches_exact_rational_mean(contributions):
    agg = weighted_mean(contributions)
    total = sum(Fraction(c.weight) for c in contributions)
    scale = max((abs(float(v)) for c in contributions for v in c.values), default=0.0)
    for j, got in enumerate(agg.values.tolist()):
        exact = sum(Fraction(c.weight) * Fraction(float(c.values[j])) for c in contributions)
        exact /= total
        # float32 cannot resolve below its smallest subnormal, whatever the scale.
        floor = Fraction(float(np.finfo(np.float32).smallest_subnormal))
        bound = Fraction(1e-6) * abs(exact) + Fraction(1e-12 * scale) + floor
        assert abs(Fraction(got) - exact) <= bound
    assert agg.values.dtype == np.float32
    assert agg.included == tuple(c.sender for c in contributions)
    assert agg.total_weight == pytest.approx(float(total))


def test_weights_are_respected_and_scale_free():
    a = np.full(N, 1.0, np.float32)
    b = np.full(N, 5.0, np.float32)
    agg = weighted_mean([Contribution(b"a", a, 1.0), Contribution(b"b", b, 3.0)])
    np.testing.assert_array_equal(agg.values, np.full(N, 4.0, np.float32))
    scaled = weighted_mean([Contribution(b"a", a, 1e300), Contribution(b"b", b, 3e300)])
    np.testing.assert_array_equal(scaled.values, agg.values)
    clipped = centered_clip([Contribution(b"a", a, 1.0), Contribution(b"b", b, 3.0)], tau=1e9)
    np.testing.assert_allclose(clipped.values, agg.values, rtol=1e-6)


def test_weighted_mean_over_many_blocks_matches_numpy():
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(100_001).astype(np.float32) for _ in range(5)]
    ws = [1.0, 2.0, 3.0, 4.0, 5.5]
    pairs = enumerate(zip(xs, ws, strict=True))
    agg = weighted_mean([Contribution(bytes([i]), x, w) for i, (x, w) in pairs])
    expected = np.average(np.stack(xs).astype(np.float64), axis=0, weights=ws)
    np.testing.assert_allclose(agg.values, expected, rtol=1e-6, atol=1e-7)
    for report, x in zip(agg.reports, xs, strict=True):
        assert report.distance == pytest.approx(np.linalg.norm(x - expected), rel=1e-6)
        assert report.tau_ratio is None and not report.outlier


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("aggregate", [weighted_mean, centered_clip])
def test_non_finite_contribution_is_excluded_and_flagged(bad, aggregate):
    rng = np.random.default_rng(0)
    honest = [rng.standard_normal(N).astype(np.float32) for _ in range(3)]
    poisoned = rng.standard_normal(N).astype(np.float32)
    poisoned[123] = bad
    contributions = [Contribution(bytes([i]), x, 1.0) for i, x in enumerate(honest)]
    contributions.insert(1, Contribution(b"evil", poisoned, 10.0))
    agg = aggregate(contributions)
    assert np.isfinite(agg.values).all()
    assert agg.included == (b"\x00", b"\x01", b"\x02")
    assert agg.total_weight == 3.0
    report = agg.reports[1]
    assert report.sender == b"evil" and report.excluded is Exclusion.NON_FINITE
    assert not report.included and math.isnan(report.distance)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_bad_weight_is_excluded_and_flagged(weight):
    x = np.ones(8, np.float32)
    agg = weighted_mean([Contribution(b"a", x, 1.0), Contribution(b"b", 2 * x, weight)])
    np.testing.assert_array_equal(agg.values, x)
    assert agg.reports[1].excluded is Exclusion.BAD_WEIGHT


def test_nothing_to_aggregate():
    with pytest.raises(NothingToAggregate):
        weighted_mean([])
    nan = np.full(4, np.nan, np.float32)
    with pytest.raises(NothingToAggregate) as err:
        centered_clip([Contribution(b"a", nan, 1.0), Contribution(b"b", np.ones(4), 0.0)])
    assert [r.excluded for r in err.value.reports] == [Exclusion.NON_FINITE, Exclusion.BAD_WEIGHT]


def test_local_bugs_raise_value_error():
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError):
        weighted_mean([Contribution(b"a", x, 1.0), Contribution(b"a", x, 1.0)])
    with pytest.raises(ValueError):
        weighted_mean([Contribution(b"a", x, 1.0), Contribution(b"b", np.ones(5), 1.0)])
    with pytest.raises(ValueError):
        centered_clip([Contribution(b"a", x, 1.0)], tau=-1.0)
    with pytest.raises(ValueError):
        centered_clip([Contribution(b"a", x, 1.0)], center=np.ones(3))


def honest_setup(seed: int, spread: float = 0.1):
    """Three honest peers: a shared signal plus per-peer noise of relative size ``spread``."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(N)
    honest = [(base + spread * rng.standard_normal(N)).astype(np.float32) for _ in range(3)]
    weights = [100.0, 250.0, 175.0]
    mean = np.average(np.stack(honest).astype(np.float64), axis=0, weights=weights)
    contributions = [
        Contribution(f"honest{i}".encode(), x, w)
        for i, (x, w) in enumerate(zip(honest, weights, strict=True))
    ]
    return rng, contributions, mean


ATTACKS = {
    "scaled x1000": lambda rng, cs, mean: cs[0].values * 1000,
    "nan": lambda rng, cs, mean: np.full(N, np.nan, np.float32),
    "large noise": lambda rng, cs, mean: (rng.standard_normal(N) * 1e4).astype(np.float32),
    "inverted": lambda rng, cs, mean: (-10 * mean).astype(np.float32),
    "near float32 max": lambda rng, cs, mean: np.full(N, 3e38, np.float32),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("byzantine_weight", [175.0, 250.0])
def test_centered_clip_bounds_one_byzantine_among_three_honest(seed, attack, byzantine_weight):
    rng, honest, mean = honest_setup(seed)
    evil = Contribution(b"evil", ATTACKS[attack](rng, honest, mean), byzantine_weight)
    contributions = [*honest[:2], evil, honest[2]]

    agg = centered_clip(contributions)

    assert np.isfinite(agg.values).all()
    assert rel_l2(agg.values, mean) <= 0.05
    assert rel_l2(weighted_mean(honest).values, mean) <= 1e-6
    evil_report = agg.reports[2]
    if attack == "nan":
        assert evil_report.excluded is Exclusion.NON_FINITE
    else:
        assert evil_report.outlier and evil_report.tau_ratio is not None
        assert evil_report.tau_ratio > 10
    assert not any(r.outlier for r in agg.reports if r.sender.startswith(b"honest"))


def test_plain_mean_is_ruined_by_the_same_attack():
    _, honest, mean = honest_setup(0)
    evil = Contribution(b"evil", honest[0].values * 1000, 175.0)
    assert rel_l2(weighted_mean([*honest, evil]).values, mean) > 10


def test_centered_clip_without_attack_is_close_to_the_mean():
    _, honest, mean = honest_setup(4)
    agg = centered_clip(honest)
    assert rel_l2(agg.values, mean) <= 0.01
    assert agg.tau is not None and agg.tau > 0
    assert all(r.tau_ratio is not None and r.tau_ratio < 2 for r in agg.reports)


def test_centered_clip_zero_tau_stays_at_the_start():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(64).astype(np.float32) for _ in range(3)]
    cs = [Contribution(bytes([i]), x, 1.0) for i, x in enumerate(xs)]
    np.testing.assert_array_equal(centered_clip(cs, tau=0.0).values, coordinate_median(xs))
    start = np.full(64, 0.25)
    np.testing.assert_array_equal(
        centered_clip(cs, tau=0.0, center=start).values, start.astype(np.float32)
    )
    assert all(r.outlier for r in centered_clip(cs, tau=0.0).reports if r.distance > 0)


def test_centered_clip_from_previous_center_moves_at_most_tau_per_iteration():
    x = np.zeros(16, np.float32)
    x[0] = 100.0
    agg = centered_clip([Contribution(b"a", x, 1.0)], tau=1.0, center=np.zeros(16), iterations=3)
    assert agg.values[0] == pytest.approx(3.0)
    assert agg.reports[0].tau_ratio == pytest.approx(97.0)


def test_identical_contributions_give_themselves():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    agg = centered_clip([Contribution(bytes([i]), x, 1.0 + i) for i in range(4)])
    np.testing.assert_array_equal(agg.values, x)
    assert agg.tau == 0.0
    assert not any(r.outlier for r in agg.reports)


@settings(deadline=None)
@given(
    st.integers(1, 12).flatmap(
        lambda k: st.lists(
            hnp.arrays(np.float32, 20, elements=st.floats(-(2.0**100), 2.0**100, width=32)),
            min_size=k,
            max_size=k,
        )
    )
)
def test_coordinate_median_matches_numpy(xs):
    expected = np.median(np.stack(xs).astype(np.float64), axis=0)
    np.testing.assert_allclose(coordinate_median(xs), expected, rtol=1e-6, atol=1e-38)


def test_coordinate_median_across_blocks_and_many_inputs():
    rng = np.random.default_rng(9)
    for k in (7, 40):
        xs = [rng.standard_normal(70_000).astype(np.float32) for _ in range(k)]
        expected = np.median(np.stack(xs), axis=0)
        np.testing.assert_allclose(coordinate_median(xs), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", range(1, 11))
def test_sorting_network_sorts_every_zero_one_input(k):
    # The zero-one principle: a comparator network that sorts all 0/1 inputs sorts anything.
    network = aggregation._sorting_network(k)
    for bits in itertools.product((0, 1), repeat=k):
        a = list(bits)
        for i, j in network:
            if a[i] > a[j]:
                a[i], a[j] = a[j], a[i]
        assert a == sorted(a)


def noisy_small_batch(seed: int, peers: int = 3):
    """Gradients of small batches: per-peer noise as large as the shared signal."""
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal(N)
    honest = [(signal + rng.standard_normal(N)).astype(np.float32) for _ in range(peers)]
    return [Contribution(f"honest{i}".encode(), x, 2.0) for i, x in enumerate(honest)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_far_outlier_is_left_out_and_the_others_clipped_alone(seed):
    honest = noisy_small_batch(seed)
    evil = Contribution(b"evil", honest[0].values * -1000, 2.0)
    contributions = [honest[0], evil, *honest[1:]]

    agg = centered_clip(contributions)
    bounded = centered_clip(contributions, exclude_outliers=False)

    np.testing.assert_array_equal(agg.values, centered_clip(honest).values)
    assert agg.included == tuple(c.sender for c in honest)
    assert agg.total_weight == 6.0
    report = agg.reports[1]
    assert report.excluded is Exclusion.OUTLIER and report.outlier
    assert report.tau_ratio is not None and report.tau_ratio > 100
    honest_mean = weighted_mean(honest).values.astype(np.float64)
    # Clipping alone keeps the x -1000 peer's pull of share * tau per iteration: with noise as
    # large as the signal that turns much of the result against the honest mean.
    assert rel_l2(bounded.values, honest_mean) > 0.25
    assert rel_l2(agg.values, honest_mean) < 0.01


def test_outliers_that_are_not_a_minority_stay_clipped():
    honest = noisy_small_batch(3, peers=2)
    far = [Contribution(b"far0", honest[0].values * 1000, 2.0),
           Contribution(b"far1", honest[1].values * -1000, 2.0)]
    for contributions in (honest[:1] + far[:1], honest + far):
        agg = centered_clip(contributions)
        np.testing.assert_array_equal(
            agg.values, centered_clip(contributions, exclude_outliers=False).values)
        assert all(r.excluded is None for r in agg.reports)


def test_honest_contributions_are_not_left_out():
    honest = noisy_small_batch(4, peers=8)
    agg = centered_clip(honest)
    assert all(r.excluded is None and not r.outlier for r in agg.reports)
    np.testing.assert_array_equal(
        agg.values, centered_clip(honest, exclude_outliers=False).values)
