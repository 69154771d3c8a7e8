"""A report is written whole or not at all (pitsearch.report.publish), and a complete sweep whose report was cut
short by a kill gets it, logged to its parent run before that run is closed FINISHED, on the next run. In-process:
the kill is an exception raised while the figures are written (after some of them are on disk)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import SWEEP, add_trial

from pitsearch.errors import ConfigError

REPORT_FILES = {"report.md", "variants.csv", "deltas.csv", "trials.csv", "curves.png", "acc_vs_macs.png"}


class Killed(BaseException):
    """Stands in for SIGKILL: nothing below catches it."""


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A complete 4-trial grid study and its spec."""
    from pitsearch.search.spec import parse_sweep
    from pitsearch.search.storage import make_storage

    monkeypatch.chdir(tmp_path)
    spec = parse_sweep(SWEEP, base_dir=tmp_path)
    study = optuna.create_study(study_name="rep", direction="maximize",
                                storage=make_storage(None, spec.output_dir))
    for pool in ("conv", "none"):
        for seed in (0, 1):
            add_trial(study, pool, seed)
    return study, spec


def console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def kill_after_the_figures(monkeypatch):
    from pitsearch.report import figures

    real = figures.write_figures

    def write_figures(out_dir, *args):
        written, notes = real(out_dir, *args)
        assert written                      # figures are on disk when the kill comes
        raise Killed()

    monkeypatch.setattr(figures, "write_figures", write_figures)
    return lambda: monkeypatch.setattr(figures, "write_figures", real)


def test_a_report_killed_midway_is_written_by_the_rerun_and_logged_before_the_parent_closes(sweep, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pitsearch.report.sweep import StudyReporter
    from pitsearch.search.runner import finish_sweep
    from pitsearch.tracking import Tracker

    study, spec = sweep
    tracker = Tracker(f"sqlite:///{spec.output_dir.parent.parent / 'mlflow.db'}", "rep")
    parent = tracker.start_run(run_name="rep")
    report = spec.output_dir / "report"
    restore = kill_after_the_figures(monkeypatch)
    with pytest.raises(Killed):
        finish_sweep(study, spec, tracker, parent, console(), StudyReporter(), interrupted=False, trained=True)
    assert not report.exists()                      # no half report
    assert tracker.run_status(parent) == "RUNNING"
    restore()

    # The rerun finds the study complete ("nothing to train"): the report is missing, so it is written now.
    finish_sweep(study, spec, tracker, parent, console(), StudyReporter(), interrupted=False, trained=False)
    assert {p.name for p in report.iterdir()} >= REPORT_FILES
    assert "## Paired deltas" in (report / "report.md").read_text()
    client = MlflowClient(tracker.uri)
    assert {Path(a.path).name for a in client.list_artifacts(parent, "report")} >= REPORT_FILES
    assert client.get_run(parent).info.status == "FINISHED"
    assert not list(report.parent.glob(".report.*"))

    # A report that is whole and current is not written again.
    stamp = (report / "report.md").stat().st_mtime_ns
    finish_sweep(study, spec, tracker, parent, console(), StudyReporter(), interrupted=False, trained=False)
    assert (report / "report.md").stat().st_mtime_ns == stamp


def test_the_old_report_stays_whole_until_the_new_one_replaces_it(sweep, monkeypatch):
    from pitsearch.report import write_report

    study, spec = sweep
    report = write_report(study, spec).out_dir
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    add_trial(study, "conv", 2)                     # the next report differs (trials.csv, variants.csv)
    kill_after_the_figures(monkeypatch)
    with pytest.raises(Killed):
        write_report(study, spec)
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert not list(report.parent.glob(".report.*"))


def test_leftovers_of_a_killed_writer_are_removed_and_a_foreign_folder_is_never_replaced(tmp_path):
    import socket

    from pitsearch.report.publish import staged

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    leftover = tmp_path / f".report.tmp-{host}-{dead.pid}-0123abcd"
    (leftover / "curves.png").parent.mkdir()
    (leftover / "curves.png").write_bytes(b"half")
    live = tmp_path / f".report.tmp-{host}-{os.getpid()}-4567ef01"   # a writer still at work
    live.mkdir()
    with staged(tmp_path / "report") as staging:
        (staging / "report.md").write_text("new")
    assert (tmp_path / "report" / "report.md").read_text() == "new"
    assert not leftover.exists() and live.exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError) as raised:
        with staged(mine):
            pass
    assert str(raised.value).startswith(f"{mine}: holds files that are not a pitsearch report (notes.txt)")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
