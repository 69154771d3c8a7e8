"""The report's first lines: one decision per comparison, in one sentence, on the primary metric's paired
deltas, by the sequential rule of pitsearch.sequential (`decide`).

The design comes from the sweep: `sweep.seeds: {min, max, min_effect}` (an adaptive sweep) is read as it is;
a plain seed list is one look at the n paired seeds the comparison has (`min_seeds = max_seeds = n`). With a
single look nothing of alpha is spent earlier, so `decide`'s boundary is the t quantile with n - 1 degrees of
freedom and its interval is the ordinary 95% t interval of the deltas table; the sentence then says "t CI"
(calling it a sequential interval would suggest a correction for repeated looks that is not there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pitsearch.report.tables import PRIMARY_METRIC, Comparison

FIXED_METHOD = "t CI"


@dataclass(frozen=True)
class Design:
    """How comparisons are decided. min_seeds / max_seeds None: one look at the seeds there are."""

    direction: str = "maximize"
    min_effect: float = 0.0
    min_seeds: int | None = None
    max_seeds: int | None = None
    alpha: float = 0.05
    # The decided metric: an adaptive sweep's rounds decide on its first objective (pitsearch.search.rounds),
    # and the report must state those decisions, not ones on another metric.
    metric: str = PRIMARY_METRIC

    @property
    def adaptive(self) -> bool:
        return self.min_seeds is not None and self.max_seeds is not None


@dataclass(frozen=True)
class Verdict:
    """One comparison's decision: kind is one of pitsearch.sequential.KINDS, or "no interval" (under 2 seeds)."""

    comparison: str
    kind: str
    text: str
    n: int
    estimate: float = float("nan")
    half_width: float = float("nan")


def design_from(sweep_node: Mapping[str, Any] | None, objectives: Sequence[tuple[str, str]]) -> Design:
    """The sweep's decision design: `seeds: {min, max, min_effect}` when the sweep has that form (keys read
    leniently: a missing one keeps its default), the primary metric's direction from the objectives."""
    direction = dict(objectives).get(PRIMARY_METRIC, "maximize")
    seeds = (sweep_node or {}).get("seeds")
    if not isinstance(seeds, Mapping):
        return Design(direction=direction)
    metric, direction = (tuple(objectives[0]) if objectives else (PRIMARY_METRIC, direction))
    alpha = _number(seeds.get("alpha"), 0.05)
    return Design(direction=direction, min_effect=_number(seeds.get("min_effect"), 0.0),
                  min_seeds=_integer(seeds.get("min")), max_seeds=_integer(seeds.get("max")),
                  alpha=alpha if 0 < alpha < 1 else 0.05, metric=metric)


def decide_all(comparisons: Sequence[Comparison], design: Design) -> list[Verdict]:
    return [decide_one(c, design) for c in comparisons]


def decide_one(comparison: Comparison, design: Design) -> Verdict:
    from pitsearch.sequential import METHOD, decide

    delta = comparison.deltas.get(design.metric)
    deltas = delta.deltas if delta is not None else []
    n = len(deltas)
    label, variant, baseline = comparison.label, comparison.variant, comparison.baseline
    if n == 0:
        return Verdict(label, "no interval", f"{variant} vs {baseline}: no seed in common, nothing to decide", 0)
    if n == 1:
        # `decide` needs two deltas for an interval (min_seeds >= 2): say what there is instead of guessing.
        return Verdict(label, "no interval", (f"{variant} - {baseline} = {deltas[0]:+.3f} on 1 seed: no interval, "
                                              "no decision (it takes at least 2 seeds)"), 1, deltas[0])
    common = dict(min_effect=design.min_effect, direction=design.direction, variant=variant, baseline=baseline,
                  alpha=design.alpha)
    # The sweep's adaptive schedule when this comparison's n lies on it; else (a plain seed list, or more seeds
    # than its max) one look at n: an interval computed for a schedule n is not on would mean nothing.
    if design.adaptive and 2 <= design.min_seeds <= design.max_seeds and n <= design.max_seeds:
        d = decide(deltas, min_seeds=design.min_seeds, max_seeds=design.max_seeds, **common)
        text = d.text
    else:
        d = decide(deltas, min_seeds=n, max_seeds=n, **common)
        text = d.text.replace(METHOD, FIXED_METHOD)
    return Verdict(label, d.kind, text, d.n, d.estimate, d.half_width)


def method_note(design: Design, n_comparisons: int) -> str:
    """What the decision lines mean, for the report's readers."""
    if design.adaptive:
        how = (f"the sweep's sequential design (seeds min {design.min_seeds}, max {design.max_seeds}): a "
               f"{100 * (1 - design.alpha):g}% "
               "repeated confidence interval that stays valid at every look (pitsearch.sequential)")
    else:
        how = ("one look at the seeds the study has: the 95% t interval of the paired deltas (the same as in the "
               "deltas table)")
    effect = (f"; \"equivalent\" means the interval lies within ±{design.min_effect:g}" if design.min_effect > 0
              else "; no `min_effect` is set, so no comparison is declared equivalent")
    family = (f" Each decision holds at 95% on its own; {n_comparisons} comparisons are not corrected as a family."
              if n_comparisons > 1 else "")
    return (f"Delta = variant - baseline on `{design.metric}` ({design.direction}), paired by seed. Decided by "
            f"{how}{effect}. \"Better\" / \"worse\" means the interval excludes 0.{family}")


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) and number >= 0 else default
