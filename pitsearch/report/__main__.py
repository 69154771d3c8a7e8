"""`python -m pitsearch.report STUDY [--storage URL] [--baseline PATH=VALUE ...] [--out DIR]`

Makes a finished (or running) sweep's report on demand, exactly as the sweep makes it at its end: to
`<output_dir>/report/` and, when the study knows its parent MLflow run and that store is reachable, to that
run's `report/` artifacts. Exit 2 with one `error:` line when the study does not exist (nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pitsearch.urls import sqlite_path


def parse_args(argv=None) -> argparse.Namespace:
    from pitsearch.report.source import add_study_arguments

    parser = argparse.ArgumentParser(
        prog="python -m pitsearch.report",
        description="Write a sweep's report: variant table (mean ± 95%% CI over seeds), paired deltas against "
                    "the baseline, curves, accuracy vs MACs, Optuna plots.")
    add_study_arguments(parser)
    parser.add_argument("--baseline", action="append", default=[], metavar="PATH=VALUE",
                        help="the baseline variant, e.g. model.pool=none (repeatable; default: sweep.baseline)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write here instead of <output_dir>/report/")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the parent run (default: the one recorded in the study)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the parent run")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pitsearch.console import make_console
    from pitsearch.errors import ConfigError
    from pitsearch.report.source import ReportSpec, parse_baseline
    from pitsearch.search.study import StudyNotFound, open_existing_study

    console = make_console()
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"{args.out.resolve()} is a file, not a folder")
    try:
        baseline = parse_baseline(args.baseline)
        study, storage_dir = open_existing_study(args.study, args.storage)
    except (StudyNotFound, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    spec = ReportSpec.from_study(study, storage_dir)
    tracker, parent_run_id = (None, None) if args.no_mlflow else _parent_run(study, args.tracking_uri, console)
    from pitsearch.report import write_report

    report = write_report(study, spec, tracker=tracker, parent_run_id=parent_run_id, console=console,
                          baseline=baseline or None, out_dir=args.out)
    if report.logged_to:   # last, as a sweep ends: the report page in MLflow, one click away
        from pitsearch.report.publish import ARTIFACT_DIR, REPORT_PAGE

        line = tracker.browse_line(tracker.artifact_url(report.logged_to, f"{ARTIFACT_DIR}/{REPORT_PAGE}"))
        if line is not None:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def _parent_run(study, tracking_uri: str | None, console):
    """(Tracker, parent run id) when the study names a parent run in a store that exists; else (None, None)."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    uri = tracking_uri or study.user_attrs.get("mlflow_tracking_uri")
    if not run_id or not uri:
        return None, None
    if "***" in uri:
        console.print("note: the study's MLflow URI is password-masked; pass --tracking-uri to log the report")
        return None, None
    if sqlite_path(uri) is not None and not sqlite_path(uri).is_file():
        console.print(f"note: MLflow store {uri} not found; the report is not logged to MLflow")
        return None, None
    try:
        from pitsearch.tracking import Tracker

        experiment = _experiment_name(study) or "pitsearch"
        tracker = Tracker(uri, experiment)
        tracker.run_status(run_id)   # raises if the run is gone
        return tracker, run_id
    except Exception as error:  # noqa: BLE001 - an unreachable store only means no MLflow copy
        console.print(f"note: parent run {run_id} not reachable in {uri} ({type(error).__name__}); "
                      "the report is not logged to MLflow")
        return None, None


def _experiment_name(study) -> str | None:
    for trial in study.get_trials(deepcopy=False):
        name = ((trial.user_attrs.get("config") or {}).get("tracking") or {}).get("experiment")
        if name:
            return name
    return None


if __name__ == "__main__":
    from pitsearch.cli import guarded

    sys.exit(guarded(main))   # one line and exit 2 / 3 / 130 for what goes wrong, like `python -m pitsearch`
