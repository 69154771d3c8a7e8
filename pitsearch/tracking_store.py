"""Opening a local MLflow store (`sqlite:///path`) so that nothing breaks it at birth.

MLflow 3.17's SqlAlchemyStore creates a fresh database in steps that SQLite does not make atomic: the initial
tables (`create_all`), then every alembic migration, each DDL committed before its version stamp. Two processes
that create the same fresh file race (`table ... already exists`, `expected to match one row`), and a process
killed between a migration's DDL and its stamp leaves a file on which every later open re-runs that migration
and fails the same way. So here:

- the store is opened under an exclusive `flock` on `<db>.lock` beside the file until it holds its first
  experiment (then it is complete, and later opens skip the lock);
- a failed creation is retried once (a creator outside pitsearch may have been midway), then a file that holds
  no data (no experiment, no registered model) is moved aside to `<db>.incomplete-<time>` and created again;
- a file that is not an SQLite database, is damaged, or cannot be written is one `ConfigError` naming it, at
  once (a read-only file is not a server that might come back).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from pitsearch.errors import ConfigError
from pitsearch.filelock import file_lock
from pitsearch.retry import error_chain
from pitsearch.urls import sqlite_path

T = TypeVar("T")
SQLITE_HEADER = b"SQLite format 3\x00"
_SIDE_FILES = ("", "-journal", "-wal", "-shm")

log = logging.getLogger("pitsearch.tracking")


def open_store(uri: str, first_call: Callable[[], T]) -> T:
    """`first_call()`, the first request to the store at `uri` (it makes MLflow create or open it), made safe
    for a local sqlite file as described above."""
    path = sqlite_path(uri)
    if path is None:
        return first_call()
    check_usable(path)
    if _complete(path):
        return _guarded(path, first_call)
    with _creation_lock(path):
        try:
            return first_call()
        except Exception as error:  # noqa: BLE001 - a broken creation shows as sqlalchemy / alembic errors
            _raise_if_transient(error)
        time.sleep(1.0)   # a creator outside pitsearch's lock (say, an `mlflow ui` started alongside) may finish
        if _complete(path):
            return _guarded(path, first_call)
        if not _holds_data(path):
            aside = _set_aside(path)
            _forget_engine(uri)
            log.warning("%s: an MLflow store whose creation was interrupted (a killed first run?), holding no "
                        "runs; moved aside to %s and created again", path, aside.name)
        try:
            return first_call()
        except Exception as error:  # noqa: BLE001
            _raise_if_transient(error)
            raise _unusable(path, error) or ConfigError(
                str(path), f"the MLflow store cannot be opened ({_describe(error)}); restore it from a backup, or "
                           "move it away to start a new one") from None


def _raise_if_transient(error: Exception) -> None:
    from pitsearch.tracking import is_transient_mlflow_error

    if is_transient_mlflow_error(error):
        raise error


def check_usable(path: Path) -> None:
    """A file MLflow can use as its store, or one ConfigError naming it."""
    if path.exists():
        if not path.is_file():
            raise ConfigError(str(path), "is not a file; point tracking.uri at an sqlite file")
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
        if header and header != SQLITE_HEADER:
            raise ConfigError(str(path), "is not an SQLite database, so not an MLflow store; move it away, or "
                                         "point tracking.uri at another file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(str(path), "is read-only, and MLflow writes to its store; make it writable "
                                         "(chmod u+w), or point tracking.uri at another file")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(str(path), f"its folder {path.parent} is read-only, and SQLite writes its journal "
                                     "beside the store; make it writable, or point tracking.uri elsewhere")


_PROBLEMS = (("file is not a database", "is not an SQLite database, so not an MLflow store; move it away"),
             ("disk image is malformed", "is damaged (database disk image is malformed); restore it from a backup"),
             ("readonly database", "is read-only, and MLflow writes to its store; make it writable"),
             ("out-of-date database schema", "was made by an older MLflow; back it up, then run `mlflow db "
                                             "upgrade sqlite:///{path}`"))


def _guarded(path: Path, call: Callable[[], T]) -> T:
    """`call()`; the errors that say the file itself is unusable become one ConfigError naming it."""
    try:
        return call()
    except Exception as error:
        problem = _unusable(path, error)
        if problem is None:
            raise
        raise problem from None


def _unusable(path: Path, error: BaseException) -> ConfigError | None:
    for cause in error_chain(error):
        for text, problem in _PROBLEMS:
            if text in str(cause):
                return ConfigError(str(path), problem.format(path=path))
    return None


def _complete(path: Path) -> bool:
    """True once a store's creation has finished: MLflow creates its default experiment last. Read without
    locking or writing anything (a missing file stays missing)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        with _read_only(path) as db:
            return db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1 \
                and db.execute("SELECT 1 FROM experiments LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False   # missing tables, or locked by a creator: take the creation path


def _holds_data(path: Path) -> bool:
    """Any experiment or registered model (missing tables count as empty)."""
    try:
        with _read_only(path) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return any(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
                       for table in ("experiments", "registered_models") if table in tables)
    except sqlite3.Error:
        return True    # cannot tell: never move it aside


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def _creation_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `<db>.lock` (without flock, on Windows, MLflow's own creation is unguarded, as before)."""
    with file_lock(path.with_name(path.name + ".lock")):
        yield


def _set_aside(path: Path) -> Path:
    """Move the file and its SQLite side files (a stale hot journal must not meet the new file) aside."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.incomplete-{stamp}")
    for suffix in _SIDE_FILES:
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{aside}{suffix}")
    return aside


def _forget_engine(uri: str) -> None:
    """MLflow caches one engine per URI in the process; its pooled connections still point at the moved file."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:
        return
    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()


def _describe(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
