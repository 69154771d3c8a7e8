"""A sweep's report: one decision per comparison first, then per-variant tables (mean and 95% CI over seeds),
paired deltas against the baseline variant, curves and accuracy-vs-MACs plots, Optuna's plots; written to
`<output_dir>/report/` (report.html, report.md, variants.csv, deltas.csv, trials.csv, PNGs) and logged to the
sweep's parent MLflow run under `report/`, with each variant's mean curves as the parent's metrics.

A sweep writes it when it completes (`sweep.StudyReporter`, handed to pitsearch.search.runner by the CLI); `python -m pitsearch.report STUDY` makes it on
demand. Modules: `source` (open the study, what the report knows of the sweep), `tables` (numbers, CSV),
`decisions` (the sentences, by pitsearch.sequential), `figures` (PNGs), `document` (report.md and the
self-contained report.html from one list of blocks), `parent` (what goes to the parent MLflow run), `publish`
(staging folder, swap, the record a rerun checks, the link a sweep ends on), `writer` (puts it together).
Heavy imports wait until a report is made.
"""

from __future__ import annotations

from typing import Any


def write_report(study, spec, tracker=None, parent_run_id: str | None = None, console=None,
                 baseline: dict[str, Any] | None = None, out_dir=None):
    """Write the report of `study` (spec: the SweepSpec, or a pitsearch.report.source.ReportSpec) to
    `<spec.output_dir>/report/` (or `out_dir`); with a tracker and parent run, log it there as artifacts
    (`report/`) and metrics; with a console, print the tables. `baseline` ({path: value}) overrides the
    sweep's. Returns a `pitsearch.report.writer.Report`."""
    from pitsearch.report.writer import write_report as _write_report

    return _write_report(study, spec, tracker=tracker, parent_run_id=parent_run_id, console=console,
                         baseline=baseline, out_dir=out_dir)


__all__ = ["write_report"]
