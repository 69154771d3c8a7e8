"""Seed statistics for ablations, in one place: mean and t confidence interval, paired deltas, sign-flip test.

With 2-5 seeds per variant the t interval is the honest choice (a bootstrap of three values cannot be
wider than their range). A comparison of two variants pairs runs with the same seed, so the noise shared
by the seed (init, data order) cancels; it reports the mean paired delta with its t interval, an exact
two-sided sign-flip p-value and the paired t-test's p-value. Nothing here ever picks the best of n seeds.
The sequential "seeds until decided" rule (valid under repeated looks) is in pitsearch.sequential.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONFIDENCE = 0.95
EXACT_SIGN_FLIP_MAX_N = 16     # 2**16 sign patterns; above, a seeded Monte Carlo sample of patterns
MONTE_CARLO_PATTERNS = 20_000


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student t quantile for the mean of n values (n - 1 degrees of freedom)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def finite_values(values: Iterable[Any]) -> np.ndarray:
    """Floats without None, NaN and inf (a failed or missing metric is left out, never counted as zero)."""
    kept = [float(v) for v in values if v is not None]
    return np.asarray([v for v in kept if math.isfinite(v)], dtype=float)


@dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its confidence interval (NaN below two values) over n values."""

    mean: float
    half_width: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (False when it is undefined)."""
        return bool(self.n >= 2 and not math.isnan(self.half_width) and (self.low > 0 or self.high < 0))


def mean_ci(values: Iterable[Any], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t interval of scalar values; None and NaN are dropped first."""
    data = finite_values(values)
    n = len(data)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0, confidence)
    if n == 1:
        return Interval(float(data[0]), float("nan"), 1, confidence)
    half = data.std(ddof=1) / math.sqrt(n) * t_quantile(n, confidence)
    return Interval(float(data.mean()), float(half), n, confidence)


def mean_ci_curves(values: Any, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Seeds x points -> (mean, half-width) per point; half-width 0 for one seed (a plot draws no band)."""
    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=0)
    n = values.shape[0]
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, values.std(axis=0, ddof=1) / np.sqrt(n) * t_quantile(n, confidence)


def sign_flip_p_value(deltas: Iterable[float], seed: int = 0) -> float:
    """Two-sided p-value of "the mean paired delta is zero": the share of sign patterns whose mean is at
    least as far from zero as the observed one. Exact up to 16 pairs. Its floor is 2 / 2**n (0.5 with two
    seeds, 0.125 with four), which is why a few seeds rarely make a difference significant."""
    data = finite_values(deltas)
    n = len(data)
    if n == 0:
        return float("nan")
    observed = abs(data.mean()) - 1e-12 * max(1.0, abs(data.mean()))  # ties count as extreme
    if n <= EXACT_SIGN_FLIP_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(MONTE_CARLO_PATTERNS, n))
    return float(np.mean(np.abs(signs @ data / n) >= observed))


def paired_t_p_value(deltas: Iterable[float]) -> float:
    """Two-sided p-value of the paired t-test (one-sample t on the deltas, mean 0); NaN below two deltas.

    Reported beside the sign-flip p because it has no 2 / 2**n floor (three seeds can reach p < 0.05), at the
    price of assuming roughly normal deltas. Identical deltas (sd 0) give 0 for a non-zero mean, 1 for zero."""
    from scipy import stats

    data = finite_values(deltas)
    n = len(data)
    if n < 2:
        return float("nan")
    mean, sd = float(data.mean()), float(data.std(ddof=1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


@dataclass(frozen=True)
class PairedDelta:
    """variant - baseline over the keys (seeds) both have."""

    pairs: list[tuple[Hashable, float, float, float]] = field(default_factory=list)  # (key, baseline, variant, delta)
    interval: Interval = Interval(float("nan"), float("nan"), 0)
    p_value: float = float("nan")                            # exact sign-flip test
    unpaired: list[Hashable] = field(default_factory=list)   # keys only one side has (not used)
    t_p_value: float = float("nan")                          # paired t-test; last, so positional use still fits

    @property
    def deltas(self) -> list[float]:
        return [delta for *_, delta in self.pairs]


def paired_delta(baseline: Mapping[Hashable, Any], variant: Mapping[Hashable, Any],
                 confidence: float = CONFIDENCE) -> PairedDelta:
    """Pair `variant[k] - baseline[k]` for every key k (a seed) with a finite value on both sides."""
    pairs, unpaired = [], []
    for key in sorted(set(baseline) | set(variant), key=_sort_key):
        a, b = baseline.get(key), variant.get(key)
        if len(finite_values([a])) and len(finite_values([b])):
            pairs.append((key, float(a), float(b), float(b) - float(a)))
        else:
            unpaired.append(key)
    deltas = [d for *_, d in pairs]
    return PairedDelta(pairs=pairs, interval=mean_ci(deltas, confidence), p_value=sign_flip_p_value(deltas),
                       unpaired=unpaired, t_p_value=paired_t_p_value(deltas))


def pareto_indices(costs: Iterable[float], scores: Iterable[float]) -> list[int]:
    """Indices of the points no other point dominates (cost no higher and score no lower, one strictly),
    ordered by cost: the front of "lower cost, higher score". Points with a NaN are never on it."""
    points = [(i, float(c), float(s)) for i, (c, s) in enumerate(zip(costs, scores))
              if math.isfinite(float(c)) and math.isfinite(float(s))]
    front = [(i, c, s) for i, c, s in points
             if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for _, c2, s2 in points)]
    return [i for i, *_ in sorted(front, key=lambda p: (p[1], -p[2]))]


def _sort_key(key: Any) -> tuple:
    return (0, key, "") if isinstance(key, (int, float)) else (1, 0, str(key))


__all__ = ["CONFIDENCE", "Interval", "PairedDelta", "finite_values", "mean_ci", "mean_ci_curves", "paired_delta",
           "paired_t_p_value", "pareto_indices", "sign_flip_p_value", "t_quantile"]
