"""What the report puts on the sweep's parent MLflow run besides its files: the key numbers (one value each) and
each variant's mean curves over seeds, so the parent's Model-metrics tab draws curves, not only bars.

Curves are `variant/<variant>/<metric>` with step = epoch (0-based, as the trials' own runs log them), the mean
over the variant's completed seeds, all in one batched request. Their timestamp is the variant's last trial
completion, not the time of logging: a report made again from the same trials sends points the store already
holds (same key, step, value, timestamp) and drops, so the history keeps one point per epoch. (New trials change
a variant's mean and its timestamp; MLflow cannot delete metric points, so the old ones stay beside the new.)
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from pitsearch.report.tables import PRIMARY_METRIC, Comparison, metric_key

CURVE_METRICS = ("train/loss", "train/acc", "val/acc", "gen/gap")   # the paper's curves, and the gap between
MAX_CURVE_VARIANTS = 20   # a TPE study has a variant per trial: a chart per variant and metric past this is noise


def parent_metrics(variants: list[dict[str, Any]], comparisons: list[Comparison]) -> dict[str, float]:
    """The key numbers for the parent run: each variant's val/acc_best mean and CI, each delta's mean, CI, p."""
    short = PRIMARY_METRIC.replace("/", "_")
    metrics: dict[str, float] = {}
    for row in variants:
        iv = row["metrics"][PRIMARY_METRIC]
        metrics[metric_key("variant", row["variant"], f"{short}_mean")] = iv.mean
        metrics[metric_key("variant", row["variant"], f"{short}_ci95")] = iv.half_width
        metrics[metric_key("variant", row["variant"], "n_seeds")] = row["n"]
    for c in comparisons:
        d = c.deltas[PRIMARY_METRIC]
        metrics[metric_key("delta", c.label, f"{short}_mean")] = d.interval.mean
        metrics[metric_key("delta", c.label, f"{short}_ci95")] = d.interval.half_width
        metrics[metric_key("delta", c.label, f"{short}_p_sign_flip")] = d.p_value
        metrics[metric_key("delta", c.label, f"{short}_p_t_test")] = d.t_p_value
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}  # MLflow takes no NaN


def curve_variants(variants: list[dict[str, Any]], direction: str = "maximize") -> tuple[list[dict[str, Any]],
                                                                                       str | None]:
    """The variants whose curves go to the parent run: all of them, or the MAX_CURVE_VARIANTS best by the
    primary metric's mean (with a note saying so)."""
    if len(variants) <= MAX_CURVE_VARIANTS:
        return list(variants), None
    sign = -1 if direction == "maximize" else 1

    def rank(row):
        mean = row["metrics"][PRIMARY_METRIC].mean
        return sign * mean if math.isfinite(mean) else math.inf

    kept = sorted(variants, key=rank)[:MAX_CURVE_VARIANTS]
    return kept, (f"the parent MLflow run holds the mean curves of the {MAX_CURVE_VARIANTS} best of "
                  f"{len(variants)} variants by {PRIMARY_METRIC} (every variant is in variants.csv and curves.png)")


def curve_points(variants: list[dict[str, Any]], completed_ms: dict[int, int] | None = None
                 ) -> list[tuple[str, float, int, int]]:
    """(key, value, step, timestamp ms) of each variant's mean curve of each CURVE_METRICS metric over its
    completed seeds, cut to its shortest run; steps with no finite value are left out."""
    completed_ms = completed_ms or {}
    now = int(time.time() * 1000)
    points = []
    for row in variants:
        records = [r for r in row["records"] if r.get("history")]
        stamp = max((completed_ms.get(r["number"], 0) for r in records), default=0) or now
        for metric in CURVE_METRICS:
            series = [np.asarray(r["history"].get(metric) or [], dtype=float) for r in records]
            length = min((len(s) for s in series), default=0)
            if not length:
                continue
            stacked = np.stack([s[:length] for s in series])
            finite = np.isfinite(stacked)
            counts = finite.sum(axis=0)
            means = np.where(finite, stacked, 0.0).sum(axis=0) / np.maximum(counts, 1)
            key = metric_key("variant", row["variant"], metric)
            points += [(key, float(means[step]), step, stamp) for step in range(length) if counts[step]]
    return points


def log_to_parent(tracker, run_id: str, files, variants, comparisons, curves: list[tuple[str, float, int, int]],
                  artifact_dir: str) -> None:
    for path in files:
        tracker.log_artifact(run_id, path, artifact_dir)
    tracker.log_metrics(run_id, parent_metrics(variants, comparisons), step=0)
    if curves:
        tracker.log_metric_points(run_id, curves)
