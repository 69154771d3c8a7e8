"""A report appears whole or not at all, and a complete study always ends up with one.

The files are written into a staging folder beside the report folder (`.report.tmp-<host>-<pid>-<random>`),
which then takes the report folder's place by rename; the old report is moved aside only at that moment and
deleted after. A process killed while writing leaves the old report (or none) plus a staging folder, which a
later write removes.

After the folder is in place and the parent MLflow run holds its artifacts, the study records it (user
attribute `report_written`: folder, a fingerprint of the trials' states, parent run). A rerun of a complete
sweep writes the report again when that record does not match: report missing, killed midway, trials changed
since, or never logged to the parent run. Light imports only: the sweep runner checks this at every end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pitsearch.errors import ConfigError

REPORT_ATTR = "report_written"
REPORT_SUFFIXES = (".md", ".csv", ".png", ".html")   # what a report folder holds; anything else is not ours
REPORT_PAGE = "report.html"   # a folder without it predates it: report_is_current says no, and it is made again
ARTIFACT_DIR = "report"       # the report's folder in the parent MLflow run's artifacts
STALE_S = 24 * 3600                         # another host's leftover staging folder is removed after a day


def default_report_dir(rspec) -> Path:
    return Path(rspec.output_dir) / "report"


def trials_fingerprint(study) -> str:
    """Changes whenever a trial is added or changes state (what the report's tables depend on)."""
    states = sorted((t.number, t.state.name) for t in study.get_trials(deepcopy=False))
    return hashlib.sha1(json.dumps(states).encode()).hexdigest()[:16]


def report_is_current(study, rspec, parent_run_id: str | None) -> bool:
    """True when the default report folder holds the report of the study as it is now, logged to
    `parent_run_id` (None: no MLflow)."""
    record = study.user_attrs.get(REPORT_ATTR) or {}
    folder = default_report_dir(rspec)
    # report.html is required too: a report written before it existed is made again (and logged), so the link a
    # sweep prints to it opens something.
    return (record.get("dir") == str(folder) and (folder / "report.md").is_file() and (folder / REPORT_PAGE).is_file()
            and record.get("trials") == trials_fingerprint(study) and record.get("logged_to") == parent_run_id)


def browse_line(study, spec, tracker, parent_run_id: str) -> str | None:
    """The line a sweep ends on: `browse: <link>` to the report page in the parent run's artifacts when the run
    holds the study's current report, else to the parent run's page (pitsearch.tracking.Tracker.browse_line);
    None for a store without a UI. `spec`: a SweepSpec or ReportSpec."""
    from pitsearch.report.source import ReportSpec

    if report_is_current(study, ReportSpec.from_sweep(spec), parent_run_id):
        return tracker.browse_line(tracker.artifact_url(parent_run_id, f"{ARTIFACT_DIR}/{REPORT_PAGE}"))
    return tracker.browse_line(tracker.run_url(parent_run_id))


def mark_written(study, rspec, folder: Path, logged_to: str | None, fingerprint: str) -> None:
    """Record a finished report of the trials `fingerprint` describes (taken before the report read them), only
    for the default folder: that is the one a rerun checks."""
    if Path(folder) == default_report_dir(rspec):
        study.set_user_attr(REPORT_ATTR, {"dir": str(folder), "trials": fingerprint, "logged_to": logged_to})


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """Yields an empty staging folder; when the block ends normally, it replaces `folder` whole. On an error
    the staging folder is removed and `folder` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(folder)
    _remove_leftovers(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{_owner()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, folder: Path) -> None:
    """Two renames (a folder cannot replace a non-empty one in one): only between them is there no report."""
    for _ in range(5):   # another writer of the same folder may slip in between; it is whole too
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{_owner()}-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
        try:
            os.replace(staging, folder)
        except OSError:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            time.sleep(0.1)
            continue
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"{folder}: could not put the new report in place")


def _check_replaceable(folder: Path) -> None:
    """The old folder is replaced whole: it must hold nothing but report files (an --out folder of the user's
    is never emptied)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(str(folder), "exists and is not a folder; write the report elsewhere (--out DIR)")
    foreign = [p.name for p in folder.iterdir() if not (p.is_file() and p.suffix in REPORT_SUFFIXES)]
    if foreign:
        raise ConfigError(str(folder), f"holds files that are not a pitsearch report ({', '.join(sorted(foreign)[:3])}"
                                       "); a report replaces its whole folder: write it to a new one (--out DIR)")


def _owner() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _remove_leftovers(folder: Path) -> None:
    """Staging / old folders of writers that died: this host's whose process is gone, any host's after a day."""
    host = socket.gethostname().replace("-", "_")
    for path in folder.parent.glob(f".{folder.name}.*-*-*-*"):
        parts = path.name.rsplit("-", 3)
        if not path.is_dir() or len(parts) != 4 or parts[0] not in (f".{folder.name}.tmp", f".{folder.name}.old"):
            continue
        mine = parts[1] == host and parts[2].isdigit()
        try:
            stale = (not _alive(int(parts[2]))) if mine else time.time() - path.stat().st_mtime > STALE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
