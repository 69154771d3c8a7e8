"""pitsearch.sequential: the "seeds until decided" rule, its interval, and simulations of its error rates.

The simulations are vectorized over comparisons with numpy and seeded, so they are deterministic and the file
runs in a few seconds on one core. Each prints what it measured (`pytest -s` shows it). Limits on a rate that
should be <= alpha allow three Monte Carlo standard errors of the measured rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from pitsearch.sequential import (
    Decision,
    critical_values,
    decide,
    obrien_fleming_spending,
    sequential_interval,
    simulate_decisions,
)
from pitsearch.stats import mean_ci

ALPHA = 0.05
MIN, MAX = 3, 12
COMPARISONS = 20_000          # per scenario; SE of a rate near 0.05 is 0.0015


def limit(rate: float = ALPHA, n: int = COMPARISONS) -> float:
    """alpha plus three Monte Carlo standard errors of a rate measured on n comparisons."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / n)


def report(label: str, kinds: np.ndarray, used: np.ndarray) -> dict[str, float]:
    rates = {kind: float(np.mean(kinds == kind)) for kind in ("better", "worse", "equivalent", "undecided")}
    print(f"\n{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in rates.items()) + f"; mean seeds {used.mean():.2f}")
    return rates


def null_deltas(rng: np.random.Generator, heavy_tailed: bool = False) -> np.ndarray:
    """No true effect; each comparison has its own realistic sd of the accuracy delta, 0.01 to 0.1."""
    sd = rng.uniform(0.01, 0.1, size=(COMPARISONS, 1))
    noise = rng.standard_t(3, size=(COMPARISONS, MAX)) if heavy_tailed else rng.standard_normal((COMPARISONS, MAX))
    return sd * noise


def t_statistics(x: np.ndarray) -> np.ndarray:
    """|mean / (sd / sqrt(n))| of the first n values of each row, for n = MIN..MAX (columns)."""
    n = np.arange(MIN, MAX + 1)
    mean = np.cumsum(x, axis=1)[:, MIN - 1:MAX] / n
    var = (np.cumsum(x * x, axis=1)[:, MIN - 1:MAX] - n * mean**2) / (n - 1)
    return np.abs(mean) / np.sqrt(np.maximum(var, 0) / n)


# ------------------------------------------------------------------------------------------------ boundaries


def test_one_look_is_the_fixed_t_interval():
    assert critical_values(5, 5) == pytest.approx([sps.t.ppf(0.975, 4)])
    deltas = [0.01, 0.03, -0.005, 0.02, 0.015]
    fixed = mean_ci(deltas)
    assert sequential_interval(deltas, 5, 5).half_width == pytest.approx(fixed.half_width, rel=1e-12)


def test_boundaries_first_look_exact_then_wider_than_fixed_t():
    bounds = critical_values(MIN, MAX)
    looks = np.arange(MIN, MAX + 1)
    spent_first = obrien_fleming_spending(MIN / MAX)
    assert bounds[0] == pytest.approx(sps.t.isf(spent_first / 2, MIN - 1))
    assert np.all(bounds > sps.t.ppf(0.975, looks - 1))         # the price of looking ten times
    assert np.all(np.diff(bounds) < 0)                           # O'Brien-Fleming: strict early, close to t late
    assert bounds[-1] == pytest.approx(2.53, abs=0.05)            # 15% above t_11 = 2.20
    assert obrien_fleming_spending(1.0) == ALPHA
    assert np.array_equal(bounds, critical_values(MIN, MAX))      # seeded: the same every time


def test_boundaries_have_simultaneous_coverage_on_fresh_paths():
    """Paths independent of the ones the boundaries were fitted on: P(|T_n| >= c_n at some look) = alpha."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((50_000, MAX))
    crossed = float(np.mean((t_statistics(x) >= critical_values(MIN, MAX)).any(axis=1)))
    print(f"\nboundary crossing on fresh normal paths (3..12 seeds): {crossed:.4f}")
    assert abs(crossed - ALPHA) < 3 * math.sqrt(ALPHA * (1 - ALPHA) / 50_000) + 0.002


def test_design_is_checked():
    with pytest.raises(ValueError):
        critical_values(1, 12)
    with pytest.raises(ValueError):
        critical_values(5, 4)
    with pytest.raises(ValueError):
        sequential_interval([0.1] * 13, 3, 12)                    # past the schedule: boundaries say nothing
    with pytest.raises(ValueError):
        decide([0.1, 0.2, 0.3], direction="up")


# ------------------------------------------------------------------------------------------------ decide


def test_decide_better_worse_and_the_sentence():
    deltas = [0.25, 0.2, 0.3, 0.22, 0.25]
    d = decide(deltas, variant="conv", baseline="none")
    assert isinstance(d, Decision) and d.kind == "better" and d.decided and d.n == 5
    assert d.estimate == pytest.approx(np.mean(deltas))
    assert d.half_width == pytest.approx(critical_values(MIN, MAX)[2] * np.std(deltas, ddof=1) / math.sqrt(5))
    assert d.text == f"conv is better than none by +0.244 ± {d.half_width:.3f} (95% sequential CI, 5 seeds)"
    worse = decide([-x for x in deltas], variant="conv", baseline="none")
    assert worse.kind == "worse" and "worse than none by -0.244" in worse.text
    # A loss: a lower value is better, so a negative delta is "better".
    assert decide([-x for x in deltas], direction="minimize").kind == "better"


def test_decide_equivalent_undecided_continue():
    small = [0.001, -0.002, 0.0005, 0.0015, 0.0, -0.001, 0.001, 0.0]
    eq = decide(small, min_effect=0.005, variant="conv", baseline="none")
    assert eq.kind == "equivalent" and -0.005 < eq.low and eq.high < 0.005
    assert eq.text.startswith("conv is equivalent to none: no difference larger than 0.005 (")
    assert decide(small).kind == "continue"                       # min_effect 0: never "equivalent"
    noisy = np.random.default_rng(1).normal(0, 0.02, MAX)
    undecided = decide(noisy, min_effect=0.005)
    assert undecided.kind == "undecided" and undecided.text.startswith("undecided after 12 seeds: ")
    assert decide(noisy[:6]).kind == "continue" and not decide(noisy[:6]).decided
    early = decide([0.01, 0.02])
    assert early.kind == "continue" and math.isnan(early.half_width) and "first look at 3 seeds" in early.text
    assert decide([0.1, None, float("nan"), 0.1, 0.1]).n == 3     # missing values dropped, as in paired_delta
    assert decide([]).n == 0


def test_signed_kind_wins_over_equivalent_and_says_so():
    d = decide([0.002, 0.0021, 0.0019, 0.002, 0.0022], min_effect=0.005)
    assert d.kind == "better" and d.within_min_effect and "smaller than min_effect 0.005" in d.text


def test_decide_and_simulate_decisions_agree():
    rng = np.random.default_rng(5)
    deltas = rng.normal(0.01, 0.01, size=(300, MAX)) * rng.uniform(0.2, 2, size=(300, 1))
    kinds, used, estimate, half = simulate_decisions(deltas, min_effect=0.004)
    for row, kind, n, est, hw in zip(deltas, kinds, used, estimate, half):
        d = next(d for d in (decide(row[:k], min_effect=0.004) for k in range(MIN, MAX + 1)) if d.decided)
        assert (d.kind, d.n) == (kind, n)
        assert (d.estimate, d.half_width) == pytest.approx((est, hw))


# ------------------------------------------------------------------------------------------------ simulations


@pytest.mark.parametrize("heavy_tailed", [False, True], ids=["normal", "t3"])
def test_null_false_decision_rate_at_most_alpha(heavy_tailed):
    """(a) No true effect, a look after every seed from 3 to 12: false "better"/"worse" <= alpha."""
    rng = np.random.default_rng(100 + heavy_tailed)
    kinds, used, *_ = simulate_decisions(null_deltas(rng, heavy_tailed), min_effect=0.0)
    rates = report(f"null, {'t(3)' if heavy_tailed else 'normal'} deltas, sd 0.01-0.1, {COMPARISONS} comparisons",
                   kinds, used)
    false_rate = rates["better"] + rates["worse"]
    print(f"false better/worse rate {false_rate:.4f} (limit {limit():.4f})")
    assert false_rate <= limit()


@pytest.mark.parametrize(("effect_sd", "min_power", "max_mean_seeds"), [(1.0, 0.75, 10.0), (2.0, 0.99, 7.0)])
def test_power_decisions_come(effect_sd, min_power, max_mean_seeds):
    """(b) A true effect of 1 or 2 sd of the deltas: "better" comes by 12 seeds, usually well before."""
    rng = np.random.default_rng(200 + int(effect_sd))
    sd = 0.03
    kinds, used, *_ = simulate_decisions(rng.normal(effect_sd * sd, sd, size=(COMPARISONS, MAX)), min_effect=0.0)
    rates = report(f"true effect {effect_sd:g} sd (sd {sd}), {COMPARISONS} comparisons", kinds, used)
    print(f"power by 12 seeds {rates['better']:.4f}, wrong sign {rates['worse']:.5f}, mean seeds {used.mean():.2f}")
    assert rates["better"] >= min_power and used.mean() <= max_mean_seeds
    assert rates["worse"] <= 0.001


@pytest.mark.parametrize("sd", [0.003, 0.0055, 0.008])
def test_false_equivalent_at_min_effect_at_most_alpha(sd):
    """(c) True effect exactly min_effect: the interval lies inside +-min_effect (an "equivalent", or a
    "better" said to be smaller than min_effect) at most alpha of the time. sd 0.0055 is near the worst case."""
    rng = np.random.default_rng(300 + int(sd * 1e4))
    min_effect = 0.005
    deltas = rng.normal(min_effect, sd, size=(COMPARISONS, MAX))
    kinds, used, estimate, half = simulate_decisions(deltas, min_effect=min_effect)
    report(f"true effect = min_effect {min_effect} (sd {sd})", kinds, used)
    inside = (estimate - half > -min_effect) & (estimate + half < min_effect) & (kinds != "continue")
    print(f"false 'equivalent' rate {np.mean(kinds == 'equivalent'):.4f}, interval inside the margin "
          f"{inside.mean():.4f} (limit {limit():.4f})")
    assert inside.mean() <= limit()


def test_equivalence_is_reached_with_no_effect_and_small_sd():
    rng = np.random.default_rng(400)
    kinds, used, *_ = simulate_decisions(rng.normal(0.0, 0.002, size=(COMPARISONS, MAX)), min_effect=0.005)
    rates = report("true effect 0, sd 0.002, min_effect 0.005", kinds, used)
    assert rates["equivalent"] >= 0.95 and used.mean() <= 8
    assert rates["better"] + rates["worse"] <= limit()


def test_naive_fixed_t_interval_rechecked_at_every_look_exceeds_alpha():
    """(d) Why the sequential interval is needed: the fixed-n 95% t interval re-checked after every seed from
    3 to 12 (stop when it excludes 0) declares a difference with no true effect far more often than 5%, while
    the same interval at one fixed n (12) stays at 5%."""
    rng = np.random.default_rng(500)
    deltas = null_deltas(rng)
    t_abs = t_statistics(deltas)
    naive = float(np.mean((t_abs >= sps.t.ppf(0.975, np.arange(MIN, MAX + 1) - 1)).any(axis=1)))
    fixed = float(np.mean(t_abs[:, -1] >= sps.t.ppf(0.975, MAX - 1)))
    kinds, *_ = simulate_decisions(deltas)
    sequential = float(np.mean(np.isin(kinds, ["better", "worse"])))
    print(f"\nnull, normal deltas, {COMPARISONS} comparisons: naive t interval at every look {naive:.4f}, "
          f"t interval at 12 seeds only {fixed:.4f}, sequential interval {sequential:.4f}")
    assert naive > limit() and naive > 0.12
    assert fixed <= limit() and sequential <= limit()
