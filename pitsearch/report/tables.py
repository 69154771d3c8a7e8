"""The report's numbers: per-variant means with 95% CIs, and paired deltas against the baseline variant.

A variant is one combination of the swept parameters other than the seed. A comparison pairs a variant
with its baseline counterpart: the same values of every swept parameter except the baseline's, which take
the baseline's values; trials are paired by seed, so each delta compares two runs that share init and data
order.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitsearch.report.summary import fmt_int, fmt_num, record_metric, variant_rows
from pitsearch.search.overrides import to_plain
from pitsearch.search.space import SEED_PATH
from pitsearch.stats import PairedDelta, paired_delta

PRIMARY_METRIC = "val/acc_best"
CORE_METRICS = ("val/acc_best", "train/loss", "gen/gap", "perf/img_per_s")
EXTRA_PREFIXES = ("robust/", "spatial/")   # analyses a sweep may add; they become columns on their own
COST_METRICS = ("macs", "params")
SHORT_NAMES = {"val/acc_best": "val acc best", "train/loss": "train loss", "gen/gap": "gen gap",
               "perf/img_per_s": "img/s", "robust/clean_acc": "clean acc", "robust/occlusion_acc": "occlusion acc",
               "robust/fgsm_acc": "FGSM acc", "spatial/mean_interaction_ratio": "interaction ratio",
               "spatial/mean_distance_px": "attn distance px", "spatial/mean_entropy": "attn entropy"}


def table_metrics(records: list[dict[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[str]:
    """The core metrics, any other objective, then every `robust/*` and `spatial/*` final metric found."""
    metrics = list(CORE_METRICS)
    metrics += [m for m, _ in objectives if m not in metrics and m not in COST_METRICS]
    extras = {k for r in records if r["state"] == "COMPLETE" for k in r["final"] if k.startswith(EXTRA_PREFIXES)}
    return metrics + sorted(extras - set(metrics))


def build_variants(records: list[dict[str, Any]], spec, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """`summary.variant_rows` plus each variant's decoded swept values (seed excluded)."""
    rows = variant_rows(records, metrics)
    for row in rows:
        values = spec.decode(row["records"][0]["params"])
        row["values"] = {k: to_plain(v) for k, v in values.items() if k != SEED_PATH}
        row["matched"] = row["records"][0].get("matched")   # the same for every seed of a variant
    return rows


@dataclass
class Comparison:
    """`variant` against `baseline` (labels), one PairedDelta per metric, pairs keyed by seed."""

    variant: str
    baseline: str
    deltas: dict[str, PairedDelta] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.variant} vs {self.baseline}"


def build_comparisons(variants: list[dict[str, Any]], baseline: dict[str, Any],
                      metrics: Sequence[str]) -> tuple[list[Comparison], list[str]]:
    """Every non-baseline variant against its counterpart; returns (comparisons, notes on what could not pair)."""
    if not baseline:
        return [], [("no baseline: set `sweep.baseline` (e.g. {model.pool: none}) or pass --baseline PATH=VALUE "
                     "to get paired deltas")]
    baseline = {k: to_plain(v) for k, v in baseline.items()}
    notes = []
    unknown = [p for p in baseline if not any(p in row["values"] for row in variants)]
    if unknown:
        notes.append(f"baseline {', '.join(unknown)}: not a swept parameter of any completed trial")
    by_values = {_key(row["values"]): row for row in variants}
    comparisons = []
    for row in variants:
        counterpart = {**row["values"], **{k: v for k, v in baseline.items() if k in row["values"]}}
        if counterpart == row["values"]:
            continue  # this variant is a baseline
        base = by_values.get(_key(counterpart))
        if base is None:
            notes.append(f"{row['variant']}: no completed baseline variant with "
                         + " ".join(f"{k}={v}" for k, v in counterpart.items() if row["values"].get(k) != v))
            continue
        comparison = Comparison(variant=row["variant"], baseline=base["variant"])
        for metric in metrics:
            comparison.deltas[metric] = paired_delta(_by_seed(base["records"], metric),
                                                     _by_seed(row["records"], metric))
        if not comparison.deltas[metrics[0]].pairs:
            notes.append(f"{comparison.label}: no seed in common, nothing to pair")
        comparisons.append(comparison)
    return comparisons, notes


def _key(values: dict[str, Any]) -> str:
    return repr(sorted(values.items(), key=lambda kv: kv[0]))


def _by_seed(records: list[dict[str, Any]], metric: str) -> dict[Any, Any]:
    """seed -> value; with two complete trials of one seed (a re-run), the first one counts."""
    out: dict[Any, Any] = {}
    for record in sorted(records, key=lambda r: r["number"]):
        out.setdefault(record["seed"], record_metric(record, metric))
    return out


# ------------------------------------------------------------------------------------------------ files


def write_variants_csv(path: Path, variants: list[dict[str, Any]], metrics: Sequence[str]) -> None:
    names = _param_names(variants)
    matched = any(row.get("matched") for row in variants)
    header = ["variant", *names, "n", "seeds", "n_pruned", "n_failed", "macs", "params",
              *(["matched"] if matched else [])]
    for metric in metrics:
        header += [f"{metric} mean", f"{metric} ci95", f"{metric} low", f"{metric} high"]
    rows = []
    for row in variants:
        line = [row["variant"], *(_cell(row["values"].get(n)) for n in names), row["n"],
                " ".join(map(str, row["seeds"])), row["n_pruned"], row["n_failed"], _cell(row["macs"]),
                _cell(row["n_params"]), *([matched_text(row.get("matched"))] if matched else [])]
        for metric in metrics:
            iv = row["metrics"][metric]
            line += [_cell(iv.mean), _cell(iv.half_width), _cell(iv.low), _cell(iv.high)]
        rows.append(line)
    _write_csv(path, header, rows)


def write_deltas_csv(path: Path, comparisons: list[Comparison]) -> None:
    """One row per comparison and metric: the per-seed deltas, then their mean, CI, sign-flip p and paired t p."""
    header = ["variant", "baseline", "metric", "n_pairs", "seeds", "deltas", "mean", "ci95", "low", "high",
              "ci_excludes_zero", "p_sign_flip", "p_t_test", "baseline_mean", "variant_mean"]
    rows = []
    for c in comparisons:
        for metric, d in c.deltas.items():
            iv = d.interval
            rows.append([c.variant, c.baseline, metric, iv.n, " ".join(str(k) for k, *_ in d.pairs),
                         " ".join(f"{x:.6g}" for x in d.deltas), _cell(iv.mean), _cell(iv.half_width),
                         _cell(iv.low), _cell(iv.high), iv.excludes_zero, _cell(d.p_value), _cell(d.t_p_value),
                         _cell(_mean(a for _, a, _, _ in d.pairs)), _cell(_mean(b for _, _, b, _ in d.pairs))])
    _write_csv(path, header, rows)


def write_trials_csv(path: Path, records: list[dict[str, Any]], spec, metrics: Sequence[str]) -> None:
    names = sorted({k for r in records for k in r["params"]})
    objectives = [m for m, _ in spec.objectives]
    header = ["number", "state", "variant", "seed", *names, *[f"objective {m}" for m in objectives], "macs",
              "params", *metrics, "wall_seconds", "train_seconds", "eval_seconds", "reason", "mlflow_run_id"]
    rows = []
    for r in records:
        decoded = spec.decode(r["params"])
        values = list(r["values"]) + [None] * (len(objectives) - len(r["values"]))
        rows.append([r["number"], r["state"], r["variant"], _cell(r["seed"]),
                     *(_cell(decoded.get(n)) for n in names), *(_cell(v) for v in values), _cell(r["macs"]),
                     _cell(r["n_params"]), *(_cell(r["final"].get(m)) for m in metrics), _cell(r["wall_seconds"]),
                     _cell(r["train_seconds"]), _cell(r["eval_seconds"]), r["reason"], r["mlflow_run_id"] or ""])
    _write_csv(path, header, rows)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return value


def _mean(values) -> float:
    data = list(values)
    return sum(data) / len(data) if data else float("nan")


def _param_names(variants: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in variants:
        names += [k for k in row["values"] if k not in names]
    return names


# ------------------------------------------------------------------------------------------------ text


def mean_pm(interval, digits: int = 4) -> str:
    """`0.9123 ± 0.0150`, `0.9123` for one seed, empty for none."""
    if interval.n == 0:
        return ""
    if interval.n == 1 or math.isnan(interval.half_width):
        return fmt_num(interval.mean, digits)
    return f"{fmt_num(interval.mean, digits)} ± {fmt_num(interval.half_width, digits)}"


def metric_digits(metric: str, digits: int = 4) -> int:
    return 0 if metric == "perf/img_per_s" else digits


def variant_table_rows(variants: list[dict[str, Any]], metrics: Sequence[str],
                       digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the variant table (shared by report.md and the terminal)."""
    header = ["variant", "n", *(SHORT_NAMES.get(m, m) for m in metrics), "MACs", "params"]
    rows = [[row["variant"], str(row["n"]), *(mean_pm(row["metrics"][m], metric_digits(m, digits)) for m in metrics),
             fmt_int(row["macs"]), fmt_int(row["n_params"])] for row in variants]
    if any(row.get("matched") for row in variants):   # sweep.match: one more column, only then
        header.append("matched")
        for cells, row in zip(rows, variants):
            cells.append(matched_text(row.get("matched")))
    return header, rows


def matched_text(matched: dict[str, Any] | None) -> str:
    """A variant's `sweep.match` outcome in a cell: `reference`, or the re-sized knobs and the cost ratio to the
    reference (`head_dims [7, 6, 7], 0.987x MACs`; `unchanged, 1.016x MACs` when already within tolerance)."""
    if not matched:
        return ""
    if matched.get("reference"):
        return "reference"
    changes = ", ".join(f"{key.removeprefix('model.')} {value}" for key, value in matched["changes"].items())
    unit = "MACs" if matched["on"] == "macs" else "params"
    return f"{changes or 'unchanged'}, {matched['ratio']:.3f}x {unit}"


def delta_table_rows(comparisons: list[Comparison], metrics: Sequence[str],
                     digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """One row per comparison and metric: n pairs, per-seed deltas, mean ± CI, CI excludes zero, the sign-flip p
    and the paired t-test's p side by side (the first exact but floored at 2/2^n, the second unfloored but
    assuming roughly normal deltas: a reader sees when they disagree)."""
    header = ["comparison", "metric", "pairs", "per-seed delta", "mean delta ± 95% CI", "CI excludes 0",
              "p (sign flip)", "p (t-test)"]
    rows = []
    for c in comparisons:
        for metric in metrics:
            d = c.deltas.get(metric)
            if d is None:
                continue
            places = metric_digits(metric, digits)
            per_seed = " ".join(f"{k}:{delta:+.{places}f}" for k, _, _, delta in d.pairs)
            rows.append([c.label, SHORT_NAMES.get(metric, metric), str(d.interval.n), per_seed,
                         _signed_pm(d.interval, places), _yes_no(d.interval), fmt_p(d.p_value),
                         fmt_p(d.t_p_value)])
    return header, rows


def fmt_p(p: float) -> str:
    """A p-value in three decimals; "< 0.001" rather than a "0.000" that reads as impossible."""
    if p is None or math.isnan(p):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _signed_pm(interval, digits: int) -> str:
    if interval.n == 0:
        return ""
    text = f"{interval.mean:+.{digits}f}"
    return text if math.isnan(interval.half_width) else f"{text} ± {interval.half_width:.{digits}f}"


def _yes_no(interval) -> str:
    if interval.n < 2:
        return "n/a"
    return "yes" if interval.excludes_zero else "no"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def escape(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str, header: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title, padding=(0, 1))
    for i, column in enumerate(header):
        text_column = i == 0 or column in ("comparison", "metric", "per-seed delta", "matched")
        table.add_column(column, justify="left" if text_column else "right", overflow="fold",
                         no_wrap=column in ("MACs", "params", "n", "pairs"))
    for row in rows:
        table.add_row(*row)
    return table


# What MLflow allows in a metric key on every OS (its colon is refused on Windows): letters, digits, _ - . space /.
_ILLEGAL_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_KEY_LENGTH = 250   # MLflow's MAX_ENTITY_KEY_LENGTH


def metric_key(*parts: str) -> str:
    """An MLflow-legal metric key from free-text parts joined by "/" (a variant label may hold "/" too).

    MLflow also refuses a key that reads as another path ("a//b", "a/./b", a trailing "/"), so empty, "." and
    ".." segments go. Over 250 characters, the longest part (the variant label, never the metric name at the
    end) is shortened and given a hash of itself, so two long labels stay two keys."""
    cleaned = [_key_part(part) for part in parts]
    excess = len("/".join(cleaned)) - MAX_KEY_LENGTH
    if excess > 0:
        import hashlib

        i = max(range(len(cleaned)), key=lambda j: len(cleaned[j]))
        digest = hashlib.sha1(str(parts[i]).encode()).hexdigest()[:8]
        cleaned[i] = _key_part(cleaned[i][:max(1, len(cleaned[i]) - excess - 9)]) + "-" + digest
    return "/".join(cleaned)[:MAX_KEY_LENGTH]


def _key_part(part: Any) -> str:
    segments = (s.strip() for s in _ILLEGAL_KEY_CHARS.sub("_", str(part)).split("/"))
    return "/".join("_" if s in (".", "..") else s for s in segments if s) or "_"
