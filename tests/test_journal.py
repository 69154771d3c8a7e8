"""The study journal survives what a crash or a full disk does to it (pitsearch.search.journal): a torn last
record is cut off (with a backup) before anything is appended; damage elsewhere is one ConfigError naming the
file; a failed write is rolled back. Through `make_storage`, which sweeps, reports and exports all use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from helpers import load_study, run_cli, synthetic_study, tiny_sweep

from pitsearch.errors import ConfigError
from pitsearch.search.journal import BACKUP_INFIX
from pitsearch.search.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def journal_study(folder: Path, n_trials: int = 3) -> Path:
    """A study `s` with `n_trials` complete trials; returns its journal."""
    study = optuna.create_study(study_name="s", storage=make_storage(None, folder))
    for value in range(n_trials):
        study.tell(study.ask(), float(value))
    return folder / "optuna-journal.log"


def reopen(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=make_storage(None, folder))


def backups(journal: Path) -> list[Path]:
    return sorted(journal.parent.glob(f"{journal.name}{BACKUP_INFIX}*.bak"))


DAMAGE = {
    "cut mid-record": lambda data: data[:-20],                                      # a short last write
    "partial line appended": lambda data: data + b'{"op_code":4,"worker_id":"ab',   # disk full mid-record
    "merged line at the end": lambda data: data + b'{"op_code":5,"tri{"op_code":4,"worker_id":"x"}\n',
    "zeros after a power loss": lambda data: data + b"\0" * 300,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_torn_last_record_is_cut_off_with_a_backup(tmp_path, damage):
    journal = journal_study(tmp_path)
    damaged = DAMAGE[damage](journal.read_bytes())
    journal.write_bytes(damaged)

    study = reopen(tmp_path)
    assert journal.read_bytes().endswith(b"\n")
    [backup] = backups(journal)
    assert backup.read_bytes() == damaged
    finished = [t.number for t in study.trials if t.state.name == "COMPLETE"]
    assert finished[:2] == [0, 1]   # the cut record was trial 2's last one, at most
    study.tell(study.ask(), 7.0)    # appending works, and a fresh reader sees every record
    again = reopen(tmp_path)
    assert [t.value for t in again.trials if t.state.name == "COMPLETE"][-1] == 7.0
    assert len(again.trials) == len(study.trials)


def test_a_torn_tail_left_by_another_writer_is_repaired_before_appending(tmp_path):
    """A worker of the same study died mid-record while this one had the journal open."""
    journal = journal_study(tmp_path)
    study = reopen(tmp_path)
    with open(journal, "ab") as handle:
        handle.write(b'{"op_code":8,"worker_id":"dead","trial_id":1,"user_attr":{"histo')
    study.tell(study.ask(), 5.0)
    assert len(backups(journal)) == 1
    assert [t.value for t in reopen(tmp_path).trials] == [0.0, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("damage", ["bad line in the middle", "random bytes", "foreign tail"])
def test_damage_that_is_not_a_cut_write_is_one_config_error_and_the_file_is_untouched(tmp_path, damage):
    import random

    journal = journal_study(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    if damage == "bad line in the middle":
        lines[2] = lines[2][:25] + b"\n"
        data = b"".join(lines)
    elif damage == "random bytes":
        data = random.Random(0).randbytes(4000)
    else:
        data = b"".join(lines) + b"hello"
    journal.write_bytes(data)

    with pytest.raises(ConfigError) as raised:
        reopen(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{journal}: ") and "\n" not in message
    assert journal.read_bytes() == data and not backups(journal)


def test_a_failed_write_is_rolled_back_and_the_writer_stops(tmp_path):
    """A real short write: the file size limit (RLIMIT_FSIZE) stands in for a full disk, in a child process."""
    journal = journal_study(tmp_path)
    clean = journal.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, optuna
        from pathlib import Path
        from pitsearch.search.journal import JournalWriteError
        from pitsearch.retry import ServiceUnavailable
        from pitsearch.search.storage import make_storage
        study = optuna.load_study(study_name="s", storage=make_storage(None, Path({str(tmp_path)!r})))
        trial = study.ask()
        size = Path({str(journal)!r}).stat().st_size
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, resource.RLIM_INFINITY))
        for attempt in range(2):
            try:
                trial.set_user_attr("history", "x" * 2000)
            except JournalWriteError as error:
                assert isinstance(error, ServiceUnavailable) and error.service == "Optuna storage"
                print("refused:", error)
        print("size", Path({str(journal)!r}).stat().st_size - size)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == lines[1] and lines[2] == "size 0", result.stdout
    assert "cannot write the study's journal" in lines[0] and "partial record was removed" in lines[0]
    assert journal.read_bytes().startswith(clean) and journal.read_bytes().endswith(b"\n")
    study = reopen(tmp_path)
    assert not backups(journal) and "history" not in study.trials[-1].user_attrs


def test_report_and_export_read_a_torn_journal_and_refuse_a_damaged_one_in_one_line(tmp_path, monkeypatch, capsys):
    from pitsearch.export import main as export_main
    from pitsearch.report.__main__ import main as report_main

    synthetic_study(tmp_path)                                # for the report
    exported = optuna.create_study(study_name="s", storage=make_storage(None, tmp_path / "pitsearch-sweeps" / "s"))
    trial = exported.ask()
    trial.set_user_attr("config", {"model": {"name": "pit_nano"}, "train": {"seed": 0}})
    exported.tell(trial, 0.5)
    monkeypatch.chdir(tmp_path)
    journals = {name: tmp_path / "pitsearch-sweeps" / name / "optuna-journal.log" for name in ("synth", "s")}
    for journal in journals.values():   # a write cut short
        journal.write_bytes(journal.read_bytes() + b'{"op_code":8,"worker_id":"w","trial_id":0,"user_attr":{"fin')
    assert export_main(["s"]) == 0
    assert report_main(["synth", "--no-mlflow"]) == 0
    assert (tmp_path / "pitsearch-sweeps" / "synth" / "report" / "report.md").is_file()
    assert [len(backups(journal)) for journal in journals.values()] == [1, 1]
    capsys.readouterr()

    for name, main in (("synth", report_main), ("s", export_main)):
        journal = journals[name]
        lines = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(b"".join(lines[:1] + [b"garbage\n"] + lines[1:]))
        assert main([name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {journal}: line 2 ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_sweep_stops_in_one_line_on_a_full_disk_and_resumes_from_a_torn_journal(tmp_path):
    import os
    import resource
    import signal

    config_dir = tiny_sweep(tmp_path, "torn", seeds="[0]")
    args = ["--config-dir", config_dir, "+sweep=torn", "tracking.enabled=false", "sweep.report=false"]
    run_cli([*args, "sweep.n_trials=1"], cwd=tmp_path, check=True)
    journal = tmp_path / "pitsearch-sweeps" / "torn" / "optuna-journal.log"
    first = load_study(tmp_path, "torn").trials
    assert [t.state.name for t in first] == ["COMPLETE"]

    size = journal.stat().st_size

    def full_disk():   # the journal can grow by 1,500 bytes: the next trial's first records, not its config
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1500, resource.RLIM_INFINITY))

    full = subprocess.run([sys.executable, "-m", "pitsearch", *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, preexec_fn=full_disk, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert full.returncode == 3, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{journal}: cannot write the study's journal" in errors[0], full.stderr
    assert "Traceback" not in full.stderr and journal.read_bytes().endswith(b"\n")

    journal.write_bytes(journal.read_bytes() + b'{"op_code":4,"worker_id":"9f1c-1","study_id":0,"datetime_st')
    rerun = run_cli(args, cwd=tmp_path, check=True)
    assert "Traceback" not in rerun.stderr
    study = load_study(tmp_path, "torn")
    finished = [t.state.name for t in study.trials]
    assert finished.count("COMPLETE") == 2 and set(finished) <= {"COMPLETE", "FAIL"}   # FAIL: the full disk's trial
    assert study.trials[0].values == first[0].values and study.trials[0].params == first[0].params
    assert len(backups(journal)) == 1
