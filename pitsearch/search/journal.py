"""The journal file behind a sweep's study, made crash-safe: every sweep, report and export opens it through
`SafeJournalFileBackend` (via `pitsearch.search.storage.make_storage`).

Optuna's `JournalFileBackend` appends one JSON record per line and replays the file on every read. A record cut
short (disk full, power loss, a copy interrupted) is harmless to Optuna's reader while it is the last line (it is
skipped), but the next append lands on the same line, and from then on every read of the study fails. So:

- Opening the journal, and every append, first looks at its end. A tail that lacks its final newline, or a last
  line that does not parse, was never seen by any reader; it is cut off (under the journal's own lock, after
  copying the whole file to `<name>.torn-<time>.bak` beside it) before anything is appended.
- A tail that is not the start of an Optuna record (`{"op_code":`), or a bad line in the middle, is not a
  crash's work: one `ConfigError` naming the file, and the file is left as it is.
- A write that fails (disk full) is undone: the file is truncated back to its size before the write, and the
  backend raises `JournalWriteError` (a `ServiceUnavailable` of the Optuna storage: the worker stops, exit 3, one
  line) and appends nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._file import get_lock_file

from pitsearch.errors import ConfigError
from pitsearch.retry import ServiceUnavailable

RECORD_PREFIX = b'{"op_code":'   # Optuna writes every record as json.dumps({"op_code": ..., ...}), compact
BACKUP_INFIX = ".torn-"
_CHUNK = 1 << 16

log = logging.getLogger("pitsearch.journal")


class JournalWriteError(ServiceUnavailable):
    """The journal could not be written (disk full, I/O error); what was half-written is rolled back."""

    def __init__(self, path: str, error: OSError, rolled_back: bool):
        # Not ServiceUnavailable's "unreachable for Ns" text: nothing was waited for, and the fix is the user's.
        self.service, self.target, self.waited_s = "Optuna storage", str(path), 0.0
        undone = ("the partial record was removed" if rolled_back
                  else "its torn last record is cut off (with a backup) on the next run")
        RuntimeError.__init__(self, f"{path}: cannot write the study's journal ({error.strerror or error}); "
                                    f"{undone}; free the disk and run the same command again to resume")


class SafeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file with a clean end guaranteed before each append (see the module doc)."""

    def __init__(self, file_path: str | Path):
        path = str(file_path)
        # The open(O_EXCL) lock works on local disks, NFSv3+ and Windows (symlinks need privileges there).
        super().__init__(path, lock_obj=JournalFileOpenLock(path))
        self._failed: JournalWriteError | None = None
        if torn_tail(path) is not None:   # looked at without the lock first: the common case is a clean end
            self._locked(self._repair_tail)

    def read_logs(self, log_number_from: int):
        """Optuna's reader; a record that does not parse (followed by others) is one `ConfigError`, no traceback."""
        line = log_number_from
        try:
            for record in super().read_logs(log_number_from):
                if not isinstance(record, dict) or "op_code" not in record:
                    raise ValueError("not a journal record")
                line += 1
                yield record
        except ValueError:   # json.JSONDecodeError, UnicodeDecodeError, Optuna's "Invalid log format"
            raise ConfigError(self._file_path, f"line {line + 1} is not an Optuna journal record: the file is "
                                               "damaged before its end (not by a cut-off write); restore it from a "
                                               "backup, or move it away to start the study afresh") from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self._failed is not None:   # a worker whose write failed writes nothing more
            raise self._failed
        data = ("\n".join(json.dumps(entry, separators=(",", ":")) for entry in logs) + "\n").encode("utf-8")
        with get_lock_file(self._lock):
            if not _ends_clean(self._file_path):   # a writer died mid-record since this process last looked
                self._repair_tail()
            size = os.path.getsize(self._file_path)
            try:
                _append(self._file_path, data)
            except OSError as error:
                self._failed = JournalWriteError(self._file_path, error, _truncate(self._file_path, size))
                raise self._failed from error

    def _locked(self, action) -> None:
        try:
            with get_lock_file(self._lock):
                action()
        except OSError as error:   # e.g. a read-only folder: the lock file cannot be created
            raise ConfigError(self._file_path, f"its last record is cut off and cannot be repaired here "
                                               f"({error.strerror or error}); run once where it is writable") from None

    def _repair_tail(self) -> None:
        """Cut off a torn tail (the lock is held, so no live writer is mid-record), keeping a backup."""
        found = torn_tail(self._file_path)
        if found is None:
            return
        keep, tail = found
        if not _looks_like_record(tail):
            raise ConfigError(self._file_path, f"ends with {len(tail)} bytes that are not an Optuna journal "
                                               "record (not a study journal?); the file was left as it is")
        backup = _backup(Path(self._file_path))
        os.truncate(self._file_path, keep)
        log.warning("%s: its last record was cut off (%d bytes; an interrupted write); removed it, the original "
                    "is kept as %s", self._file_path, len(tail), backup.name)


def torn_tail(path: str | Path) -> tuple[int, bytes] | None:
    """(offset, tail) when the file ends with a tail no reader has applied: bytes after the last newline, or a
    last line that does not parse as a record; None for a clean end (or an empty file)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = _line_start(handle, size)
        if start < size:
            handle.seek(start)
            return start, handle.read()
        start = _line_start(handle, size - 1)
        handle.seek(start)
        line = handle.read()
    try:
        if isinstance(json.loads(line), dict):
            return None
    except ValueError:
        pass
    return start, line


def _line_start(handle, end: int) -> int:
    """The offset just after the last newline before `end` (0 when there is none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - _CHUNK)
        handle.seek(start)
        found = handle.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
    return 0


def _ends_clean(path: str) -> bool:
    with open(path, "rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _looks_like_record(tail: bytes) -> bool:
    """The start of a record Optuna wrote, cut anywhere; NUL bytes are what a power loss leaves unwritten."""
    text = tail.rstrip(b"\0\r\n").lstrip(b"\0")
    return text.startswith(RECORD_PREFIX) or RECORD_PREFIX.startswith(text)


def _backup(path: Path) -> Path:
    """A copy of the whole file beside it, made before anything is cut (a full disk refuses it: then nothing is
    cut, and the error says why)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    backup = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}.bak")
    counter = 1
    while backup.exists():
        counter += 1
        backup = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}-{counter}.bak")
    try:
        shutil.copyfile(path, backup)
    except OSError as error:
        backup.unlink(missing_ok=True)
        raise ConfigError(str(path), f"its last record is cut off, and no backup could be made before repairing "
                                     f"it ({error.strerror or error}); free space and run again") from None
    return backup


def _append(path: str, data: bytes) -> None:
    """Like Optuna's append (O_APPEND, fsync), unbuffered, so a failed write leaves nothing behind in Python."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate(path: str, size: int) -> bool:
    try:
        os.truncate(path, size)   # shrinking needs no free space
        return True
    except OSError:
        return False
