"""Write a study's report: tables (CSV + markdown), figures, the parent MLflow run's artifacts and metrics, and
the terminal tables. See pitsearch.report for what is in it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitsearch.report.publish import default_report_dir, mark_written, staged, trials_fingerprint
from pitsearch.report.source import OUTPUT_DIR_ATTR, SWEEP_SPEC_ATTR, ReportSpec
from pitsearch.report.tables import (
    PRIMARY_METRIC,
    Comparison,
    build_comparisons,
    build_variants,
    delta_table_rows,
    markdown_table,
    metric_key,
    rich_table,
    table_metrics,
    variant_table_rows,
    write_deltas_csv,
    write_trials_csv,
    write_variants_csv,
)
from pitsearch.search.summary import fmt_num, trial_records

ARTIFACT_DIR = "report"


@dataclass
class Report:
    """What write_report produced."""

    out_dir: Path
    files: list[Path]
    metrics: list[str]
    variants: list[dict[str, Any]]
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)
    logged_to: str | None = None          # the parent run id, when artifacts went to MLflow


def write_report(study, spec, tracker=None, parent_run_id: str | None = None, console=None,
                 baseline: dict[str, Any] | None = None, out_dir: Path | None = None) -> Report:
    started = time.perf_counter()
    rspec = ReportSpec.from_sweep(spec)
    if baseline:
        rspec.baseline = dict(baseline)
    out_dir = Path(out_dir or default_report_dir(rspec))
    _remember_spec(study, rspec)

    fingerprint = trials_fingerprint(study)   # before reading the trials: a trial told meanwhile is not in it
    records = trial_records(study)
    metrics = table_metrics(records, rspec.objectives)
    variants = build_variants(records, rspec, metrics)
    comparisons, notes = build_comparisons(variants, rspec.baseline, metrics)
    from pitsearch.report.figures import write_figures

    # Written whole into a staging folder that then replaces the report folder (pitsearch.report.publish): a
    # kill midway leaves the previous report, never a mix of two or a report without its figures.
    with staged(out_dir) as staging:
        write_variants_csv(staging / "variants.csv", variants, metrics)
        write_deltas_csv(staging / "deltas.csv", comparisons)
        write_trials_csv(staging / "trials.csv", records, rspec, metrics)
        figures, figure_notes = write_figures(staging, study, rspec, variants)
        notes += figure_notes
        report = Report(out_dir=out_dir, files=[], metrics=metrics, variants=variants, comparisons=comparisons,
                        notes=notes)
        (staging / "report.md").write_text(_markdown(study, rspec, records, report, figures))
    figures = [out_dir / path.name for path in figures]
    report.files = [out_dir / n for n in ("report.md", "variants.csv", "deltas.csv", "trials.csv")] + figures

    if tracker is not None and parent_run_id:
        for path in report.files:
            tracker.log_artifact(parent_run_id, path, ARTIFACT_DIR)
        tracker.log_metrics(parent_run_id, parent_metrics(variants, comparisons), step=0)
        report.logged_to = parent_run_id
    # Last: a rerun of the complete sweep writes the report again unless this record matches the study.
    mark_written(study, rspec, out_dir, report.logged_to, fingerprint)
    if console is not None:
        print_report(report, rspec, console, seconds=time.perf_counter() - started)
    return report


def _remember_spec(study, rspec: ReportSpec) -> None:
    """Store the sweep node and output dir in the study, so the report CLI reads the same spec later."""
    if rspec.sweep_node and study.user_attrs.get(SWEEP_SPEC_ATTR) != rspec.sweep_node:
        study.set_user_attr(SWEEP_SPEC_ATTR, rspec.sweep_node)
    if study.user_attrs.get(OUTPUT_DIR_ATTR) != str(rspec.output_dir):
        study.set_user_attr(OUTPUT_DIR_ATTR, str(rspec.output_dir))


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
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}  # MLflow takes no NaN


def _markdown(study, rspec: ReportSpec, records, report: Report, figures: list[Path]) -> str:
    counts = {s: sum(r["state"] == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    objectives = ", ".join(f"{m} ({d})" for m, d in rspec.objectives)
    baseline = " ".join(f"{k}={v}" for k, v in rspec.baseline.items()) or "none"
    lines = [f"# Report: sweep `{rspec.study_name}`", "",
             (f"{len(records)} trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} "
              f"failed, {counts['RUNNING']} running. Objectives: {objectives}. Baseline: `{baseline}`."), "",
             ("Means are over seeds with a 95% t confidence interval (`mean ± half-width`); only COMPLETE trials "
              "count (pruned runs stopped early). Deltas pair trials with the same seed; `p` is the exact two-sided "
              "sign-flip test (its floor is 2/2^n, 0.5 with two seeds). Never best-of-n."), "",
             "## Variants", "", markdown_table(*variant_table_rows(report.variants, report.metrics)), ""]
    lines += ["## Paired deltas against the baseline", ""]
    if report.comparisons:
        lines += [markdown_table(*delta_table_rows(report.comparisons, report.metrics)), ""]
    else:
        lines += ["No comparison (see notes).", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    lines += ["## Trials", "", markdown_table(
        ["#", "state", "variant", "seed", PRIMARY_METRIC, "wall s", "reason"],
        [[str(r["number"]), r["state"], r["variant"], str(r["seed"]), fmt_num(r["final"].get(PRIMARY_METRIC)),
          fmt_num(r["wall_seconds"], 1), r["reason"]] for r in records]), ""]
    lines += [("Files: `variants.csv` (one row per variant), `deltas.csv` (one row per comparison and metric, "
               "per-seed deltas included), `trials.csv` (one row per trial)."), ""]
    return "\n".join(lines)


def print_report(report: Report, rspec: ReportSpec, console, seconds: float | None = None) -> None:
    if report.variants:
        console.print(rich_table(f"{rspec.study_name}: variants (mean ± 95% CI over seeds)",
                                 *variant_table_rows(report.variants, report.metrics, digits=3)))
    else:
        console.print(f"{rspec.study_name}: no completed trial, no variant to report")
    if report.comparisons:
        header, rows = delta_table_rows(report.comparisons, [PRIMARY_METRIC], digits=3)
        keep = [i for i, column in enumerate(header) if column != "metric"]   # one metric: it is in the title
        console.print(rich_table(f"{rspec.study_name}: {PRIMARY_METRIC}, paired deltas vs baseline (same seed)",
                                 [header[i] for i in keep], [[row[i] for i in keep] for row in rows]))
    for note in report.notes:
        console.print(f"note: {note}")
    where = f" and to MLflow run {report.logged_to} ({ARTIFACT_DIR}/)" if report.logged_to else ""
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    console.print(f"report written to {report.out_dir}{where}{took}")
