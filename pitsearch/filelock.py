"""The one inter-process lock pitsearch uses: an exclusive `flock` on a lock file.

The lock file is created if missing and never removed (removing it would let two holders each lock a different
file). The kernel releases the lock when its holder dies, so a killed process blocks nobody. Used for the
decode cache (pitsearch.datacache), the birth of a local MLflow store (pitsearch.tracking_store) and handing
out grid cells (pitsearch.search.grid). Where there is no flock (Windows) the block runs unlocked: each caller
says why that is still safe.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def file_lock(path: Path, *, on_wait: Callable[[], None] | None = None,
              timeout_s: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` for the block; yields whether it is held. `on_wait` is called once when
    another process holds it. With `timeout_s`, give up waiting after that long (a lock file on a network file
    system that never answers) and run the block unlocked, yielding False."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        locked = _try(fcntl, handle)
        if not locked and on_wait is not None:
            on_wait()
        if not locked and timeout_s is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        deadline = time.monotonic() + (timeout_s or 0)
        while not locked and time.monotonic() < deadline:
            time.sleep(0.05)
            locked = _try(fcntl, handle)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _try(fcntl, handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
