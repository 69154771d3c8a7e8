"""Bounded retries with exponential backoff, for the two servers a sweep depends on: the Optuna storage database
and the MLflow tracking server. One policy in one place; `pitsearch.tracking` and `pitsearch.search.storage`
decide which errors are worth waiting out.

A call that keeps failing with a transient error (connection refused or reset, server restarting, 5xx) is
retried with doubling, jittered sleeps until `timeout_s` has passed, then `ServiceUnavailable` says which server,
for how long, and the last error, in one line.

Ctrl-C never cuts a call in half: a KeyboardInterrupt raised inside an SQLite write (MLflow's sqlite store, an
Optuna sqlite storage) can leave the file write-locked for the rest of the process (measured: 4 of 60 interrupts
of MLflow `log_batch`), and the sweep's own clean-up then waits on that lock. A first Ctrl-C during an attempt is
raised when the attempt returns; a second one is raised at once. The sleeps between attempts stay interruptible.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from pitsearch.masking import mask_url

DEFAULT_TIMEOUT_S = 60.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0

T = TypeVar("T")
log = logging.getLogger("pitsearch.retry")


class ServiceUnavailable(RuntimeError):
    """A server stayed unreachable for the whole retry window."""

    def __init__(self, service: str, target: str, waited_s: float, error: BaseException | str):
        self.service, self.target, self.waited_s = service, target, waited_s
        detail = error if isinstance(error, str) else _describe(error)
        super().__init__(f"{service} {mask_url(target)} unreachable for {waited_s:.0f}s "
                         f"(sweep.retry_timeout_s); last error: {detail}")


def retry_call(
    fn: Callable[..., T],
    *args: Any,
    service: str,
    target: str,
    is_transient: Callable[[BaseException], bool],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_delay_s: float = FIRST_DELAY_S,
    max_delay_s: float = MAX_DELAY_S,
    **kwargs: Any,
) -> T:
    """`fn(*args, **kwargs)`, retried while it raises a transient error and `timeout_s` has not passed.

    Other errors propagate at once. The first failure of a streak and the recovery are logged as warnings, so a
    user watching a worker sees that it waits for a server rather than silence.
    """
    started = time.monotonic()
    delay = first_delay_s
    attempt = 0
    while True:
        try:
            with sigint_deferred():
                result = fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - classified right below
            if not is_transient(error):
                raise
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise ServiceUnavailable(service, target, waited, error) from error
            if attempt == 0:
                log.warning("%s %s unreachable (%s); retrying for up to %.0fs", service, mask_url(target),
                            _describe(error), timeout_s)
            pause = min(delay * random.uniform(1.0, 1.25), max_delay_s, max(0.0, timeout_s - waited))
            time.sleep(pause)
            delay = min(delay * 2, max_delay_s)
            attempt += 1
            continue
        if attempt:
            log.warning("%s %s reachable again after %.1fs", service, mask_url(target), time.monotonic() - started)
        return result


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block ends, then raise KeyboardInterrupt;
    a second Ctrl-C inside the block raises at once. Only in the main thread (the only one Python delivers
    signals to) and only over Python's default handler: a nested block, or a program with its own SIGINT
    handler, is left alone."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []

    def hold(signum, frame):
        received.append(signum)
        if len(received) > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if len(received) == 1:  # the held Ctrl-C wins over whatever the block raised
            raise KeyboardInterrupt


def error_chain(error: BaseException):
    """The error and its causes / contexts, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _describe(error: BaseException) -> str:
    """The root cause (wrappers like Optuna's StorageInternalError say little), as `Type: first line`."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return mask_url(text[0] if text else type(error).__name__)[:300]
