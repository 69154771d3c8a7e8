"""Optuna storages from one `sweep.storage` value: a journal file for processes on one host, a database URL
for many machines; and `mask_url` for anything that prints or logs a URL."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from pitsearch.errors import ConfigError

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
DEFAULT_JOURNAL_NAME = "optuna-journal.log"

# ---------------------------------------------------------------------------------------------- storage


def make_storage(
    storage_value: str | Path | None,
    default_dir: Path,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 2,
) -> BaseStorage:
    """`sweep.storage` -> an Optuna storage.

    None: a journal file under `default_dir`; a path ending .log/.journal/.jsonl: that journal file
    (the choice for several processes on one host); `sqlite:///`, `postgresql://`, `mysql://`: RDBStorage
    with a heartbeat (it only beats under `study.optimize`) that retries stale trials `max_retry` times.
    """
    if storage_value is None:
        return _journal(Path(default_dir) / DEFAULT_JOURNAL_NAME)
    value = str(storage_value)
    if "://" in value:
        return _rdb(value, heartbeat_interval, grace_period, max_retry)
    if value.endswith(JOURNAL_SUFFIXES):
        return _journal(Path(value).expanduser())
    raise ConfigError(
        "sweep.storage",
        f"{mask_url(value)!r} is neither a journal file (ending {', '.join(JOURNAL_SUFFIXES)}) nor a "
        "sqlite:///, postgresql:// or mysql:// URL",
    )


def journal_path(storage: BaseStorage) -> Path | None:
    """The journal file behind a storage from make_storage (None for an RDB)."""
    backend = getattr(storage, "_backend", None)
    path = getattr(backend, "_file_path", None)
    return Path(path) if path else None


def _journal(path: Path) -> JournalStorage:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The open(O_EXCL) lock works on local disks, NFSv3+ and Windows (symlinks need privileges there).
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _rdb(url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None) -> RDBStorage:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme == "sqlite":
        url = _absolute_sqlite_url(url)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}  # waits out `database is locked`
    elif scheme in ("postgresql", "postgres"):
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 1800, "connect_args": {"connect_timeout": 10}}
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
            return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except ImportError as e:
        hint = " (pip install 'psycopg[binary]')" if scheme.startswith("postgres") else ""
        raise ConfigError("sweep.storage", f"no database driver for {mask_url(url)}{hint}: {e}") from None
    except Exception as e:  # sqlalchemy OperationalError, bad URL, ...
        raise ConfigError("sweep.storage", f"cannot open {mask_url(url)}: {_mask_text(str(e), url)}") from None


def _absolute_sqlite_url(url: str) -> str:
    # sqlite:///rel.db resolves against the CWD, and Hydra jobs may chdir: pin it now.
    prefix, sep, rest = url.partition(":///")
    path, qmark, query = rest.partition("?")
    if not sep or not path or path == ":memory:" or path.startswith("file:"):
        raise ConfigError("sweep.storage", f"{url} is not a persistent sqlite file URL (sqlite:///path.db)")
    db = Path(path).expanduser().resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"{prefix}:///{db}{qmark}{query}"


def mask_url(url: str) -> str:
    """Replace the password of a URL (in user:password@ or a password= query) with `***`."""
    text = str(url)
    head, sep, rest = text.partition("://")
    if sep:
        netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
        userinfo, at, hostinfo = netloc.rpartition("@")
        if at and ":" in userinfo:
            text = f"{head}://{userinfo.split(':', 1)[0]}:***@{hostinfo}{rest[len(netloc):]}"
    return re.sub(r"([?&](?:password|passwd)=)[^&#]*", r"\1***", text, flags=re.IGNORECASE)


def _mask_text(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


# ---------------------------------------------------------------------------------------------- study




def _retry_callback(max_retry: int | None):
    from pitsearch.search.trials import RetryStaleTrialCallback  # trials imports this module's neighbours

    return RetryStaleTrialCallback(max_retry=max_retry)
