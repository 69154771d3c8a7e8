"""pitsearch.stats against independent computations (scipy, brute force)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from pitsearch.stats import (
    mean_ci,
    mean_ci_curves,
    paired_delta,
    paired_t_p_value,
    pareto_indices,
    sign_flip_p_value,
)


def scipy_half_width(values) -> float:
    values = np.asarray(values, dtype=float)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
    return (high - low) / 2


@pytest.mark.parametrize("values", [[0.1, 0.2], [0.81, 0.83, 0.86], [1.0, 2.0, 4.0, 8.0, 16.0]])
def test_mean_ci_matches_scipy_t_interval(values):
    interval = mean_ci(values)
    assert interval.n == len(values)
    assert interval.mean == pytest.approx(np.mean(values), abs=1e-12)
    assert interval.half_width == pytest.approx(scipy_half_width(values), rel=1e-10)
    assert interval.low == pytest.approx(interval.mean - interval.half_width)


def test_mean_ci_drops_missing_values_and_has_no_width_below_two():
    assert mean_ci([0.5, None, float("nan"), 0.7]).n == 2
    one = mean_ci([0.5, None])
    assert one.mean == 0.5 and math.isnan(one.half_width) and not one.excludes_zero
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)


def test_excludes_zero():
    assert mean_ci([0.02, 0.025, 0.03]).excludes_zero
    assert mean_ci([-0.02, -0.025, -0.03]).excludes_zero
    assert not mean_ci([0.01, 0.02, 0.03]).excludes_zero      # t(2) = 4.30: mean 0.02, half-width 0.0248


def test_mean_ci_curves_per_point_and_no_band_for_one_seed():
    runs = np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 2.0], [0.5, 2.0, 4.0]])
    mean, half = mean_ci_curves(runs)
    assert mean == pytest.approx(runs.mean(axis=0))
    assert half == pytest.approx([scipy_half_width(runs[:, j]) for j in range(3)])
    mean, half = mean_ci_curves(runs[:1])
    assert mean == pytest.approx(runs[0]) and not half.any()


def brute_force_sign_flip(deltas) -> float:
    deltas = np.asarray(deltas, dtype=float)
    observed = abs(deltas.mean())
    patterns = list(itertools.product((1, -1), repeat=len(deltas)))
    return sum(abs(np.mean(deltas * np.array(p))) >= observed - 1e-12 for p in patterns) / len(patterns)


@pytest.mark.parametrize("deltas", [[0.02, 0.03], [0.01, 0.02, 0.03], [0.05, -0.01, 0.02, 0.04, 0.03],
                                    [0.3, -0.2, 0.1, -0.4, 0.25, 0.05]])
def test_sign_flip_p_value_is_exact(deltas):
    assert sign_flip_p_value(deltas) == pytest.approx(brute_force_sign_flip(deltas))


def test_sign_flip_floor_and_large_n():
    assert sign_flip_p_value([0.1, 0.2]) == 0.5                 # 2 / 2**2: two seeds can never be significant
    assert sign_flip_p_value([0.1] * 5) == pytest.approx(2 / 32)
    rng = np.random.default_rng(1)
    assert sign_flip_p_value(rng.normal(1.0, 0.1, size=20)) < 0.01   # Monte Carlo above 16 pairs
    assert math.isnan(sign_flip_p_value([]))


def test_paired_delta_pairs_by_key_only():
    baseline = {0: 0.80, 1: 0.90, 2: 0.70, 3: 0.85}
    variant = {2: 0.72, 0: 0.81, 1: 0.93, 4: 0.99}              # seed 3 missing, seed 4 has no baseline
    result = paired_delta(baseline, variant)
    assert [key for key, *_ in result.pairs] == [0, 1, 2]
    expected = np.array([0.81 - 0.80, 0.93 - 0.90, 0.72 - 0.70])
    assert result.deltas == pytest.approx(expected.tolist())
    assert result.interval.mean == pytest.approx(expected.mean())
    assert result.interval.half_width == pytest.approx(scipy_half_width(expected))
    assert sorted(result.unpaired) == [3, 4]
    assert result.p_value == pytest.approx(brute_force_sign_flip(expected))
    assert result.t_p_value == pytest.approx(sps.ttest_1samp(expected, 0.0).pvalue)


@pytest.mark.parametrize("deltas", [[0.02, 0.03], [0.01, 0.02, 0.03], [0.05, -0.01, 0.02, 0.04, 0.03],
                                    [0.3, -0.2, 0.1, -0.4, 0.25, 0.05]])
def test_paired_t_p_value_matches_scipy(deltas):
    assert paired_t_p_value(deltas) == pytest.approx(sps.ttest_1samp(deltas, 0.0).pvalue, rel=1e-10)


def test_paired_t_p_value_edges_and_no_sign_flip_floor():
    assert math.isnan(paired_t_p_value([])) and math.isnan(paired_t_p_value([0.1, None]))
    assert paired_t_p_value([0.1, 0.1, 0.1]) < 1e-12             # identical deltas: sd 0 (up to rounding)
    assert paired_t_p_value([0.0, 0.0]) == 1.0
    assert paired_t_p_value([0.02, 0.025, 0.03]) < 0.05 < sign_flip_p_value([0.02, 0.025, 0.03])


def test_pareto_indices_lower_cost_higher_score():
    costs = [100, 200, 150, 300, 120, float("nan")]
    scores = [0.80, 0.90, 0.79, 0.95, 0.85, 0.99]
    # 150/0.79 is dominated by 100/0.80; the NaN point is never on the front.
    assert pareto_indices(costs, scores) == [0, 4, 1, 3]
