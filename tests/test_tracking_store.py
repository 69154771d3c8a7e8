"""A local MLflow store (sqlite) cannot break at birth (pitsearch.tracking_store): fresh stores created by two
processes at once, a creation killed midway, and files that are no usable store (one ConfigError naming them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pitsearch.errors import ConfigError

MAKE = textwrap.dedent("""
    import sys
    from pitsearch.tracking import Tracker
    tracker = Tracker(f"sqlite:///{sys.argv[1]}", "exp")
    print("experiment", tracker.experiment_id, tracker.start_run(run_name="r") is not None)
""")

# Dies like a SIGKILL'd first run: after one alembic migration's DDL, before its version stamp is written
# (the state after which every later open of the file failed with `table ... already exists`).
KILL_MID_MIGRATION = textwrap.dedent("""
    import os, signal, sys
    from alembic.runtime import migration
    real, steps = migration.HeadMaintainer.update_to_step, []
    def update_to_step(self, step):
        steps.append(step)
        if len(steps) == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, step)
    migration.HeadMaintainer.update_to_step = update_to_step
    from pitsearch.tracking import Tracker
    Tracker(f"sqlite:///{sys.argv[1]}", "exp")
""")


def python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory) -> Path:
    """An MLflow store made once (about 5 s); tests copy it."""
    from pitsearch.tracking import Tracker

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    Tracker(f"sqlite:///{path}", "exp")
    return path


@pytest.mark.slow   # processes that create MLflow stores: 20-40 s on 2 cores
def test_two_processes_create_one_fresh_store_together(tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    processes = [python(MAKE, db) for _ in range(2)]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert {out.strip() for out, _ in outputs} == {"experiment 1 True"}   # one experiment, made once


@pytest.mark.slow   # processes that create MLflow stores: 20-40 s on 2 cores
def test_a_store_whose_creation_was_killed_is_made_again(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from pitsearch.tracking import Tracker

    db = tmp_path / "mlflow.db"
    killed = python(KILL_MID_MIGRATION, db)
    killed.communicate(timeout=240)
    assert killed.returncode == -9 and db.is_file()

    tracker = Tracker(f"sqlite:///{db}", "exp")
    run_id = tracker.start_run(run_name="after")
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).info.run_name == "after"
    [aside] = tmp_path.glob("mlflow.db.incomplete-*")
    assert aside.stat().st_size > 0
    assert "creation was interrupted" in caplog.text


def test_a_file_that_is_not_a_database_is_one_config_error_at_once(tmp_path):
    from pitsearch.tracking import Tracker

    db = tmp_path / "mlflow.db"
    data = os.urandom(8192)
    db.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        Tracker(f"sqlite:///{db}", "exp", retry_timeout_s=10)
    assert time.monotonic() - started < 5
    assert str(raised.value).startswith(f"{db}: is not an SQLite database")
    assert db.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def _make_read_only(path: Path) -> bool:
    """chmod a-w; as root (who may write anyway) the immutable attribute, where chattr is allowed."""
    path.chmod(0o444)
    if not os.access(path, os.W_OK):
        return True
    chattr = shutil.which("chattr")
    return bool(chattr) and subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0 \
        and not os.access(path, os.W_OK)


def test_a_read_only_store_is_one_config_error_at_once_not_a_lost_server(tmp_path, complete_store):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from pitsearch.tracking import Tracker, is_transient_mlflow_error

    # What MLflow raises for a write to a read-only sqlite file: "temporarily unavailable" (503).
    wrapped = MlflowException("(sqlite3.OperationalError) attempt to write a readonly database",
                              error_code=TEMPORARILY_UNAVAILABLE)
    assert not is_transient_mlflow_error(wrapped)

    db = tmp_path / "mlflow.db"
    shutil.copyfile(complete_store, db)
    if not _make_read_only(db):
        pytest.skip("cannot make a file read-only here (root without chattr)")
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError) as raised:
            Tracker(f"sqlite:///{db}", "exp", retry_timeout_s=10)
        assert time.monotonic() - started < 5
        assert str(raised.value).startswith(f"{db}: is read-only")
    finally:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(db)], capture_output=True)
        db.chmod(0o644)
