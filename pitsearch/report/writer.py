"""Write a study's report: tables (CSV + markdown), figures, the parent MLflow run's artifacts and metrics, and
the terminal tables. See pitsearch.report for what is in it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitsearch.report import document as doc
from pitsearch.report.decisions import Design, Verdict, decide_all, design_from, method_note
from pitsearch.report.parent import curve_points, curve_variants, log_to_parent
from pitsearch.report.publish import (ARTIFACT_DIR, REPORT_PAGE, default_report_dir, mark_written, staged,
                                     trials_fingerprint)
from pitsearch.report.source import OUTPUT_DIR_ATTR, SWEEP_SPEC_ATTR, ReportSpec
from pitsearch.report.tables import (
    PRIMARY_METRIC,
    Comparison,
    build_comparisons,
    build_variants,
    delta_table_rows,
    rich_table,
    table_metrics,
    variant_table_rows,
    write_deltas_csv,
    write_trials_csv,
    write_variants_csv,
)
from pitsearch.report.summary import fmt_num, trial_records


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
    decisions: list[Verdict] = field(default_factory=list)   # one per comparison, on PRIMARY_METRIC
    design: Design = field(default_factory=Design)


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
    design = design_from(rspec.sweep_node, rspec.objectives)
    logging = tracker is not None and bool(parent_run_id)
    curve_rows, curve_note = curve_variants(variants, design.direction)
    if logging and curve_note:
        notes.append(curve_note)
    report = Report(out_dir=out_dir, files=[], metrics=metrics, variants=variants, comparisons=comparisons,
                    notes=notes, decisions=decide_all(comparisons, design), design=design)
    from pitsearch.report.figures import write_figures

    # Written whole into a staging folder that then replaces the report folder (pitsearch.report.publish): a
    # kill midway leaves the previous report, never a mix of two or a report without its figures.
    with staged(out_dir) as staging:
        write_variants_csv(staging / "variants.csv", variants, metrics)
        write_deltas_csv(staging / "deltas.csv", comparisons)
        write_trials_csv(staging / "trials.csv", records, rspec, metrics)
        figures, figure_notes = write_figures(staging, study, rspec, variants)
        notes += figure_notes
        blocks = _document(rspec, records, report, figures)
        (staging / "report.md").write_text(doc.to_markdown(blocks))
        # The same blocks with the figures inline: the one file MLflow's artifact viewer shows whole.
        (staging / REPORT_PAGE).write_text(doc.to_html(blocks, title=f"Report: sweep {rspec.study_name}"))
    figures = [out_dir / path.name for path in figures]
    report.files = [out_dir / n for n in (REPORT_PAGE, "report.md", "variants.csv", "deltas.csv", "trials.csv")]
    report.files += figures

    if logging:
        completed = {t.number: int(t.datetime_complete.timestamp() * 1000)
                     for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None}
        log_to_parent(tracker, parent_run_id, report.files, variants, comparisons,
                      curve_points(curve_rows, completed), ARTIFACT_DIR)
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


def _document(rspec: ReportSpec, records, report: Report, figures: list[Path]) -> list:
    """The report's blocks, the decisions first: what a reader came for, before the numbers behind it."""
    counts = {s: sum(r["state"] == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    objectives = ", ".join(f"{m} ({d})" for m, d in rspec.objectives)
    baseline = " ".join(f"{k}={v}" for k, v in rspec.baseline.items()) or "none"
    blocks: list = [doc.Heading(f"Report: sweep `{rspec.study_name}`", 1), doc.Heading("Decisions")]
    if report.decisions:
        blocks += [doc.Bullets([v.text for v in report.decisions], emphasis=True),
                   doc.Paragraph(method_note(report.design, len(report.decisions)))]
    else:
        blocks.append(doc.Paragraph("No comparison, so no decision (see notes)."))
    blocks += [
        doc.Heading("Sweep"),
        doc.Paragraph(f"{len(records)} trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
                      f"{counts['FAIL']} failed, {counts['RUNNING']} running. Objectives: {objectives}. "
                      f"Baseline: `{baseline}`."),
        doc.Paragraph("Means are over seeds with a 95% t confidence interval (`mean ± half-width`); only COMPLETE "
                      "trials count (pruned runs stopped early). Deltas pair trials with the same seed. "
                      "`p (sign flip)` is the exact two-sided sign-flip test (its floor is 2/2^n, 0.5 with two "
                      "seeds); `p (t-test)` is the paired t-test's, without that floor but assuming roughly normal "
                      "deltas. Never best-of-n."),
        doc.Heading("Variants"), doc.Table(*variant_table_rows(report.variants, report.metrics)),
        doc.Heading("Paired deltas against the baseline")]
    if report.comparisons:
        blocks.append(doc.Table(*delta_table_rows(report.comparisons, report.metrics)))
    else:
        blocks.append(doc.Paragraph("No comparison (see notes)."))
    if figures:
        blocks += [doc.Heading("Figures"), doc.Figures(list(figures))]
    if report.notes:
        blocks += [doc.Heading("Notes"), doc.Bullets(list(report.notes))]
    blocks += [doc.Heading("Trials"), doc.Table(
        ["#", "state", "variant", "seed", PRIMARY_METRIC, "wall s", "reason"],
        [[str(r["number"]), r["state"], r["variant"], str(r["seed"]), fmt_num(r["final"].get(PRIMARY_METRIC)),
          fmt_num(r["wall_seconds"], 1), r["reason"]] for r in records])]
    blocks.append(doc.Paragraph(
        "Files: `report.html` (this report, figures inline), `report.md`, `variants.csv` (one row per variant), "
        "`deltas.csv` (one row per comparison and metric, per-seed deltas included), `trials.csv` (one row per "
        "trial), the PNGs."))
    return blocks


def print_report(report: Report, rspec: ReportSpec, console, seconds: float | None = None) -> None:
    for verdict in report.decisions:   # first, as in report.md: the answer, then the tables behind it
        console.print(f"decision ({report.design.metric}): {verdict.text}", markup=False, highlight=False)
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
