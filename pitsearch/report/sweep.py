"""What a running sweep says about its study: `StudyReporter`, the `SweepReporter` that `python -m pitsearch`
hands to pitsearch.search.runner (which never imports this package).

While trials run: the best trial for the progress bar and the parent run's `summary.md`. At the end: the full
report when the sweep is complete (or when the last one is missing, out of date, or never reached the parent
run: pitsearch.report.publish records each finished report), else the summary table; then the link a sweep
ends on.
"""

from __future__ import annotations

from typing import Any


class StudyReporter:
    def progress(self, study, spec) -> str:
        from pitsearch.report.summary import best_text

        return best_text(study, spec)

    def refresh(self, study, spec, tracker, parent_run_id: str) -> None:
        from pitsearch.report.summary import log_parent_summary

        log_parent_summary(study, spec, tracker, parent_run_id)

    def finish(self, study, spec, tracker, parent_run_id: str | None, console, *, complete: bool,
               trained: bool) -> dict[str, Any]:
        from pitsearch.report.publish import report_is_current
        from pitsearch.report.source import ReportSpec
        from pitsearch.report.summary import log_parent_summary, print_summary, trial_records

        if tracker is not None:
            log_parent_summary(study, spec, tracker, parent_run_id)
        if complete and spec.report and (trained or not report_is_current(study, ReportSpec.from_sweep(spec),
                                                                           parent_run_id)):
            from pitsearch.report import write_report

            write_report(study, spec, tracker=tracker, parent_run_id=parent_run_id, console=console)
            return {"records": trial_records(study)}
        return print_summary(study, spec, console)

    def browse_line(self, study, spec, tracker, parent_run_id: str) -> str | None:
        from pitsearch.report.publish import browse_line

        return browse_line(study, spec, tracker, parent_run_id)
