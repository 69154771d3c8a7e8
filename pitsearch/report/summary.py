"""A study as tables: one row per trial, and one per variant (seeds aggregated, mean and 95% CI).

Everything is read from the Optuna study alone (params and user attributes), so a report can be made on any
machine that reaches the storage. The parent MLflow run gets `summary.md` and `sweep/*` metrics, refreshed as
trials finish; the full report (pitsearch.report) builds on `trial_records` and `variant_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pitsearch.search.grid import DUPLICATE
from pitsearch.search.space import SEED_PATH
from pitsearch.search.trials import FINISHED_STATES
from pitsearch.stats import Interval, mean_ci

COST_METRICS = ("macs", "params")   # user attributes of the trial, not per-epoch metrics


def trial_records(study) -> list[dict[str, Any]]:
    """Plain rows: number, state, variant, seed, params, final metrics, cost, timings, reason."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "WAITING" or trial.user_attrs.get(DUPLICATE):
            continue  # queued, or a racing machine's copy of a cell closed without running (search.grid)
        attrs = trial.user_attrs
        final = attrs.get("final") or {}
        params = dict(trial.params)
        rows.append({
            "number": trial.number, "state": trial.state.name,
            "variant": attrs.get("variant") or variant_label(params),
            "seed": attrs.get("seed", params.get(SEED_PATH)), "params": params,
            "values": list(trial.values or []),
            "final": final, "history": attrs.get("history") or {},
            "macs": attrs.get("macs"), "n_params": attrs.get("params"),
            "img_per_s": final.get("perf/img_per_s"), "wall_seconds": attrs.get("wall_seconds"),
            "train_seconds": attrs.get("train_seconds"), "eval_seconds": attrs.get("eval_seconds"),
            "reason": attrs.get("fail_reason") or attrs.get("prune_reason") or "",
            "mlflow_run_id": attrs.get("mlflow_run_id"),
            "spatial": attrs.get("spatial"),   # per-block attention profile when the trial ran eval.spatial
            "matched": attrs.get("matched"),   # sweep.match: how its model was re-sized (pitsearch.search.match)
        })
    return rows


def variant_label(params: dict[str, Any]) -> str:
    """The label of a trial that has no `variant` attribute: its non-seed params (Optuna's stored values)."""
    return " ".join(f"{k}={v}" for k, v in params.items() if k != SEED_PATH) or "default"


def record_metric(record: dict[str, Any], metric: str) -> float | None:
    """A trial's final value of `metric`; `macs` and `params` come from its cost attributes."""
    if metric == "macs":
        return record["macs"]
    if metric == "params":
        return record["n_params"]
    return record["final"].get(metric)


def variant_rows(records: list[dict[str, Any]], metrics: Sequence[str] | str) -> list[dict[str, Any]]:
    """One row per variant (in order of first appearance) over its COMPLETE trials; pruned runs stopped early,
    so they are counted (`n_pruned`, `n_failed`) but not averaged. Each metric maps to an `Interval`."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["variant"], []).append(record)
    rows = []
    for variant, group in groups.items():
        complete = [r for r in group if r["state"] == "COMPLETE"]
        if not complete:
            continue
        rows.append({
            "variant": variant, "n": len(complete), "records": complete,
            "seeds": sorted((r["seed"] for r in complete if r["seed"] is not None), key=str),
            "n_pruned": sum(r["state"] == "PRUNED" for r in group),
            "n_failed": sum(r["state"] == "FAIL" for r in group),
            "macs": complete[0]["macs"], "n_params": complete[0]["n_params"],
            "metrics": {m: mean_ci(record_metric(r, m) for r in complete) for m in metrics},
        })
    return rows


def best_text(study, spec) -> str:
    records = [r for r in trial_records(study) if r["state"] == "COMPLETE" and r["values"]]
    if not records:
        return ""
    if len(spec.objectives) > 1:
        return f"pareto front: {len(study.best_trials)} trial(s)"
    metric, direction = spec.objectives[0]
    pick = max if direction == "maximize" else min
    best = pick(records, key=lambda r: r["values"][0])
    return f"best {metric}={best['values'][0]:.4f} (trial {best['number']}, {best['variant']})"


def summary_markdown(study, spec) -> str:
    records = trial_records(study)
    metric = spec.objectives[0][0]
    counts = {state: sum(r["state"] == state for r in records) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    finished = counts["COMPLETE"] + counts["PRUNED"]
    lines = [f"# Sweep `{spec.study_name}`", "",
             (f"{finished}/{spec.n_trials} finished: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
              f"{counts['FAIL']} failed, {counts['RUNNING']} running. {best_text(study, spec)}"), "",
             f"## Variants ({metric}, mean and 95% CI over seeds)", "",
             "| variant | n | mean | ±95% CI | MACs | params |", "|---|---|---|---|---|---|"]
    sign = -1 if spec.directions[0] == "maximize" else 1
    for row in sorted(variant_rows(records, metric), key=lambda r: _sort_value(sign * r["metrics"][metric].mean)):
        interval = row["metrics"][metric]
        lines.append(f"| {row['variant']} | {row['n']} | {fmt_num(interval.mean)} | {fmt_num(interval.half_width)} | "
                     f"{fmt_int(row['macs'])} | {fmt_int(row['n_params'])} |")
    lines += ["", "## Trials", "", "| # | state | variant | seed | " + " | ".join(m for m, _ in spec.objectives)
              + " | wall s | reason |", "|---" * (6 + len(spec.objectives)) + "|"]
    for r in records:
        values = r["values"] or [None] * len(spec.objectives)
        lines.append(f"| {r['number']} | {r['state']} | {r['variant']} | {r['seed']} | "
                     + " | ".join(fmt_num(v) for v in values) + f" | {fmt_num(r['wall_seconds'], 1)} | {r['reason']} |")
    return "\n".join(lines) + "\n"


def log_parent_summary(study, spec, tracker, parent_run_id: str) -> None:
    records = trial_records(study)
    finished = [r for r in records if r["state"] in {state.name for state in FINISHED_STATES}]
    tracker.log_text(parent_run_id, summary_markdown(study, spec), "summary.md")
    metrics = {"sweep/finished": len(finished), "sweep/failed": sum(r["state"] == "FAIL" for r in records)}
    complete = [r for r in records if r["state"] == "COMPLETE" and r["values"]]
    if complete and len(spec.objectives) == 1:
        pick = max if spec.directions[0] == "maximize" else min
        metrics["sweep/best"] = pick(r["values"][0] for r in complete)
    tracker.log_metrics(parent_run_id, metrics, step=len(finished))


def print_summary(study, spec, console) -> dict[str, Any]:
    from rich.table import Table

    records = trial_records(study)
    metric = spec.objectives[0][0]
    table = Table(title=f"{spec.study_name}: {metric} by variant (mean ± 95% CI over seeds)")
    for column in ("variant", "n", metric, "± CI95", "MACs", "params"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in variant_rows(records, metric):
        interval: Interval = row["metrics"][metric]
        table.add_row(row["variant"], str(row["n"]), fmt_num(interval.mean), fmt_num(interval.half_width),
                      fmt_int(row["macs"]), fmt_int(row["n_params"]))
    console.print(table)
    counts = {state: sum(r["state"] == state for r in records) for state in ("COMPLETE", "PRUNED", "FAIL")}
    walls = [r["wall_seconds"] for r in records if r["wall_seconds"]]
    overheads = [r["wall_seconds"] - r["train_seconds"] - r["eval_seconds"] for r in records
                 if r["wall_seconds"] and r["train_seconds"] is not None and r["eval_seconds"] is not None]
    console.print(f"trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed; "
                  + (f"mean trial {np.mean(walls):.1f}s, mean overhead {np.mean(overheads):.2f}s; " if overheads else "")
                  + best_text(study, spec))
    return {"counts": counts, "records": records}


def _sort_value(value: float) -> float:
    return math.inf if math.isnan(value) else value


def fmt_num(value, digits: int = 4) -> str:
    """A float for a table cell; empty for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def fmt_int(value) -> str:
    return "" if value is None else f"{int(value):,}"
