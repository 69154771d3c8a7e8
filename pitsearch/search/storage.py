"""Optuna storages from one `sweep.storage` value: a journal file for processes on one host, a database URL
for many machines (PostgreSQL for a cluster). Database storages retry transient connection errors with backoff
for `retry_timeout_s` (pitsearch.retry) and carry Optuna's heartbeat, so a worker killed on any machine is
detected and its trial queued again. `mask_url` is for anything that prints or logs a URL."""
from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.trial import TrialState

from pitsearch.errors import ConfigError
from pitsearch.masking import mask_url
from pitsearch.retry import DEFAULT_TIMEOUT_S, ServiceUnavailable, error_chain, retry_call
from pitsearch.search.locations import JOURNAL_SUFFIXES, journal_file
from pitsearch.urls import sqlite_path, with_sqlite_path


# ---------------------------------------------------------------------------------------------- storage


def make_storage(
    storage_value: str | Path | None,
    default_dir: Path,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 2,
    retry_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> BaseStorage:
    """`sweep.storage` -> an Optuna storage.

    None: a journal file under `default_dir`; a path ending .log/.journal/.jsonl: that journal file
    (the choice for several processes on one host); `sqlite:///`, `postgresql://`, `mysql://`: an RDBStorage
    that waits out connection loss for `retry_timeout_s`, with a heartbeat every `heartbeat_interval` seconds
    (beaten by the sweep worker, see `TrialHeartbeat`) after which a silent trial is failed and re-queued
    (`max_retry` times per cell).
    """
    if storage_value is None:
        return _journal(journal_file(default_dir))
    value = str(storage_value)
    if "://" in value:
        return _rdb(value, heartbeat_interval, grace_period, max_retry, retry_timeout_s)
    if value.endswith(JOURNAL_SUFFIXES):
        return _journal(Path(value).expanduser())
    raise ConfigError(
        "sweep.storage",
        f"{mask_url(value)!r} is neither a journal file (ending {', '.join(JOURNAL_SUFFIXES)}) nor a "
        "sqlite:///, postgresql:// or mysql:// URL",
    )


def storage_label(storage_value: str | Path | None, output_dir: Path) -> str:
    """Where a sweep's trials are stored, for a printed line or a tag: the journal file or the masked URL."""
    return mask_url(str(storage_value or journal_file(output_dir)))


def _journal(path: Path) -> JournalStorage:
    from pitsearch.search.journal import SafeJournalFileBackend

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A torn last record (disk full, power loss) is cut off before anything is appended; damage in the middle
    # is one ConfigError naming the file (pitsearch.search.journal).
    return JournalStorage(SafeJournalFileBackend(path))


def _rdb(url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None,
         retry_timeout_s: float) -> RDBStorage:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme == "sqlite":
        url = _absolute_sqlite_url(url)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}  # waits out `database is locked`
    elif scheme in ("postgresql", "postgres"):
        # A server that vanishes without closing the connection (a network partition) is noticed within ~30 s,
        # not at the 2-hour TCP default, so the retry window starts.
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 1800, "connect_args": {
            "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
            "keepalives_count": 3, "tcp_user_timeout": 30000}}
    elif scheme == "mysql":
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 1800}  # below MySQL's default wait_timeout
    else:
        raise ConfigError("sweep.storage", f"unsupported URL scheme {scheme!r} in {mask_url(url)}; "
                                           "use sqlite:///, postgresql:// or mysql://")
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period,
            "heartbeat_stale_trial_callback": _retry_callback(max_retry),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A database still starting up (cluster boot) is waited for like a lost connection; machines that
            # start together on an empty database race to create Optuna's tables, and the losers try again.
            return retry_call(RetryingRDBStorage, url, engine_kwargs=engine_kwargs, retry_timeout_s=retry_timeout_s,
                              **heartbeat, service="Optuna storage", target=url, timeout_s=retry_timeout_s,
                              is_transient=lambda e: is_transient_db_error(e) or _lost_schema_race(e))
    except ServiceUnavailable as e:
        raise ConfigError("sweep.storage", str(e)) from None
    except ImportError as e:
        hint = " (pip install 'psycopg[binary]')" if scheme.startswith("postgres") else ""
        raise ConfigError("sweep.storage", f"no database driver for {mask_url(url)}{hint}: {e}") from None
    except Exception as e:  # sqlalchemy OperationalError, bad URL, ...
        raise ConfigError("sweep.storage", f"cannot open {mask_url(url)}: {_mask_text(str(e), url)}") from None


def _absolute_sqlite_url(url: str) -> str:
    # sqlite:///rel.db resolves against the CWD, and Hydra jobs may chdir: pin it now.
    path = sqlite_path(url)
    if path is None:
        raise ConfigError("sweep.storage", f"{url} is not a persistent sqlite file URL (sqlite:///path.db)")
    db = path.expanduser().resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return with_sqlite_path(url, db)


def _mask_text(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def _retry_callback(max_retry: int | None):
    from pitsearch.search.trials import RetryStaleTrialCallback  # trials imports this module's neighbours

    return RetryStaleTrialCallback(max_retry=max_retry)


# ---------------------------------------------------------------------------------------------- connection loss

# Connection-level failures worth waiting for; a wrong password or a missing database is not one of them.
_PERMANENT_DB_ERRORS = ("authentication failed", "does not exist", "no password supplied", "permission denied",
                        "no pg_hba.conf entry")


def is_transient_db_error(error: BaseException) -> bool:
    """Lost / refused / reset connections, a restarting server, a locked sqlite file."""
    import sqlalchemy.exc as sa_exc

    for cause in error_chain(error):
        message = str(cause).lower()
        if any(text in message for text in _PERMANENT_DB_ERRORS):
            return False
        if isinstance(cause, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                              sa_exc.TimeoutError, ConnectionError)):
            return True
        if type(cause).__module__.startswith("psycopg") and type(cause).__name__ in ("OperationalError",
                                                                                     "InterfaceError"):
            return True
    return False


def _lost_schema_race(error: BaseException) -> bool:
    """Another process created the same table / type / version row first (concurrent `create_all`)."""
    import sqlalchemy.exc as sa_exc

    return any(isinstance(cause, (sa_exc.IntegrityError, sa_exc.ProgrammingError))
               and any(text in str(cause) for text in ("already exists", "duplicate key", "UNIQUE constraint"))
               for cause in error_chain(error))


_in_retry = threading.local()


def _retrying(method):
    """An RDBStorage method retried on connection loss; nested storage calls run inside the outer retry."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_in_retry, "active", False):
            return method(self, *args, **kwargs)
        _in_retry.active = True
        try:
            return retry_call(method, self, *args, **kwargs, service="Optuna storage", target=self.url,
                              is_transient=is_transient_db_error, timeout_s=self.retry_timeout_s)
        finally:
            _in_retry.active = False

    return call


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDBStorage, whose every call waits out a lost database connection for `retry_timeout_s`
    (exponential backoff), then raises `ServiceUnavailable`. The engine pings pooled connections before use,
    so a restarted server is reconnected to transparently."""

    def __init__(self, url: str, *, retry_timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any):
        self.retry_timeout_s = retry_timeout_s
        super().__init__(url, **kwargs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """A retried finish whose first attempt did commit (the reply was lost) is not an error."""
        attempts = []

        def attempt():
            attempts.append(1)
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if len(attempts) > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        if getattr(_in_retry, "active", False):
            return attempt()
        _in_retry.active = True
        try:
            return retry_call(attempt, service="Optuna storage", target=self.url, is_transient=is_transient_db_error,
                              timeout_s=self.retry_timeout_s)
        finally:
            _in_retry.active = False


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
              "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
              "get_trial", "get_all_trials", "get_best_trial", "record_heartbeat", "_get_stale_trial_ids"):
    setattr(RetryingRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))
del _name


class TrialHeartbeat:
    """Beats a running trial's heartbeat every `interval` seconds from a daemon thread, for ask/tell loops
    (Optuna beats only inside `study.optimize`). A worker that dies stops beating; after the storage's grace
    period any other worker's `fail_stale_trials` fails the trial and the storage's callback re-queues it.
    No-op for storages without a heartbeat (journal files)."""

    def __init__(self, study: optuna.Study, trial_id: int):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage = study._storage
        self.trial_id = trial_id
        self.interval = self.storage.get_heartbeat_interval() if is_heartbeat_enabled(self.storage) else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> "TrialHeartbeat":
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)  # a trial without any beat is never considered stale
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - the trial's own storage calls report a lost database
                pass
