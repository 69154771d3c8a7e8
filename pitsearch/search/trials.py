"""Trial bookkeeping shared by workers: telling results, counting the budget, finding trials whose worker
died and queueing their cells again."""
from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pitsearch.search.space import SearchSpace

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialAlreadyFinished(optuna.exceptions.UpdateFinishedTrialError, ValueError):
    """`tell` on a trial that is already finished: Optuna's ValueError, typed like the storage's error for any
    other write to a finished trial."""


def tell(
    study: optuna.Study,
    trial: optuna.Trial | int,
    values: float | list[float] | None = None,
    state: TrialState | None = None,
) -> FrozenTrial:
    """`study.tell` for ask/tell loops. GridSampler calls `study.stop()` after the last cell's tell,
    which raises RuntimeError outside `study.optimize` although the trial is already recorded; that
    one error is swallowed (the budget says when to stop). Telling a trial that another worker already
    failed raises `UpdateFinishedTrialError`, as the storage does for any write to it."""
    try:
        return study.tell(trial, values, state)
    except ValueError as e:
        if "Cannot tell a" in str(e):  # another worker failed it meanwhile (a missed heartbeat)
            raise TrialAlreadyFinished(str(e)) from e
        raise
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise
        number = trial if isinstance(trial, int) else trial.number
        return study._storage.get_trial(
            study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        )


# ---------------------------------------------------------------------------------------------- budget


def count_finished(study: optuna.Study) -> int:
    """Trials that count toward the global budget: COMPLETE + PRUNED (FAIL ones are retried)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def count_running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


# ---------------------------------------------------------------------------------------------- stale trials


# Per-run user attrs that a retry must not inherit (a retry with a dead worker's tag would look stale).
PER_RUN_USER_ATTRS = ("worker", "fail_reason", "retry_of", "mlflow_run_id", "history", "final", "prune_reason")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def mark_worker(trial: optuna.Trial) -> None:
    """Record which process runs this trial, right after `ask`; fail_stale_running relies on it."""
    trial.set_user_attr("worker", worker_id())


class RetryStaleTrialCallback(RetryHeartbeatStaleTrialCallback):
    """Re-queue a failed trial as WAITING with the same params; the next `ask` (any worker) pops it.

    Like Optuna's callback, it keeps retry_history, failed_trial and GridSampler's grid_id (so the grid
    counts the cell as taken), but drops per-run user attrs and sets `user_attrs["retry_of"]`.
    GridSampler counts FAIL as visited: without a re-queue a dead worker's cell never runs again.
    """

    def __init__(self, max_retry: int | None = 2) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry, inherit_intermediate_values=False)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Returns whether the trial was re-queued (False once its chain used up max_retry)."""
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if self._max_retry is not None and len(history) > self._max_retry:
            return False
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={**{k: v for k, v in trial.user_attrs.items() if k not in PER_RUN_USER_ATTRS},
                        "retry_of": trial.number},
            system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history},
        ))
        return True


def fail_stale_running(
    study: optuna.Study, older_than_s: float | None = None, max_retry: int | None = 2
) -> list[FrozenTrial]:
    """Mark RUNNING trials left by dead workers FAIL and re-queue them; returns the failed trials.

    Two ways to tell a trial is dead: its `user_attrs["worker"]` (`host:pid`) names this host and that pid is
    gone; or (RDB storages, any host) its heartbeat has been silent for longer than the storage's grace period.
    With `older_than_s`, a trial whose liveness cannot be checked either way and which started longer ago is
    failed too. A trial of a live local pid is never touched. Each failed trial is re-queued (same params, same
    grid cell) up to `max_retry` times in its retry chain; 0 disables that.
    """
    host = socket.gethostname()
    now = time.time()
    retry = RetryStaleTrialCallback(max_retry)
    silent = set(_heartbeat_stale_ids(study))
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _stale_reason(t, host, now, older_than_s)
        if reason is None and t._trial_id in silent:
            reason = f"worker {t.user_attrs.get('worker', 'unknown')} stopped its heartbeat"
        if reason is not None and _fail(study, t, reason):
            failed.append(study._storage.get_trial(t._trial_id))
            retry(study, failed[-1])
    return failed


def _heartbeat_stale_ids(study: optuna.Study) -> list[int]:
    """Trials whose heartbeat is older than the grace period: what `optuna.storages.fail_stale_trials` fails
    (it runs before each ask in `study.optimize`); done here so that the reason is recorded and the failed
    trials' MLflow runs can be closed."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return []
    return list(storage._get_stale_trial_ids(study._study_id))


def _stale_reason(t: FrozenTrial, host: str, now: float, older_than_s: float | None) -> str | None:
    worker = t.user_attrs.get("worker")
    w_host, _, w_pid = str(worker).rpartition(":") if worker else ("", "", "")
    if w_host == host and w_pid.isdigit():
        return None if _pid_alive(int(w_pid)) else f"worker {w_pid} died"
    if older_than_s is not None and t.datetime_start is not None:
        age = now - t.datetime_start.timestamp()
        if age > older_than_s:
            return f"worker {worker or 'unknown'} unseen for {age:.0f}s (> {older_than_s:g}s)"
    return None


def _fail(study: optuna.Study, t: FrozenTrial, reason: str) -> bool:
    storage = study._storage
    try:
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        return storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished, or another worker failed it, meanwhile


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ---------------------------------------------------------------------------------------------- sweep status


@dataclass
class SweepStatus:
    """Where a sweep stands: `done` of `total` cells (grid) or trials finished (COMPLETE or PRUNED)."""

    done: int
    total: int
    unit: str                   # "cells" or "trials"
    failed: list[FrozenTrial]   # grid: the latest failure of each failed cell; else every failed trial
    retryable: int              # failed cells the next run retries
    running: int
    startable: bool             # something is left for a worker to start now
    complete: bool


def sweep_status(study: optuna.Study, spec) -> SweepStatus:
    """"Complete" means finished: every cell of a grid (or `sweep.n_trials` of them), else `n_trials` trials.
    An adaptive grid (pitsearch.search.rounds) counts the cells opened so far, and is complete once every
    comparison is decided or at max seeds and all of its opened cells finished.
    A failed cell or trial is not done: it is retried (grid: by the next run, up to MAX_CELL_ATTEMPTS)."""
    from pitsearch.search.grid import INTERRUPTED, grid_complete, grid_state
    from pitsearch.search.rounds import opened_cells, replay

    running = count_running(study)
    if spec.sampler["name"] == "grid":
        state = grid_state(study, spec.space, spec.sampler.get("seed"), opened_cells(spec))
        failed = state.failed
        retryable = sum(state.retryable(cell) for cell in failed)
        complete = grid_complete(state, spec.n_trials)
        if getattr(spec, "adaptive", None) is not None:   # and no round is left to open
            complete = complete and replay(study.get_trials(deepcopy=False), spec).finished
        return SweepStatus(done=state.done, total=min(spec.n_trials, len(state.cells)), unit="cells",
                           failed=[state.last_fail[cell] for cell in failed], retryable=retryable, running=running,
                           startable=not complete and bool(state.pending or state.queued), complete=complete)
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in FINISHED_STATES for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED]
    return SweepStatus(done=done, total=spec.n_trials, unit="trials", failed=failed, retryable=0, running=running,
                       startable=done < spec.n_trials, complete=done >= spec.n_trials)


def failures_line(study_name: str, status: SweepStatus, space: SearchSpace) -> str:
    """One line: how far the sweep got, how many cells / trials failed, and why."""
    from pitsearch.search.grid import MAX_CELL_ATTEMPTS

    def reason(trial: FrozenTrial) -> str:
        text = " ".join(str(trial.user_attrs.get("fail_reason") or "no reason recorded").split())
        return text if len(text) <= 200 else text[:197] + "..."

    if status.unit == "cells":
        shown = [f"{' '.join(space.to_overrides(space.decode(dict(t.params) or t.system_attrs.get('fixed_params', {}))))}"
                 f" ({reason(t)})" for t in status.failed[:3]]
    else:  # many trials fail alike (a sampled region that does not build): group them by reason
        counts: dict[str, int] = {}
        for trial in status.failed:
            counts[reason(trial)] = counts.get(reason(trial), 0) + 1
        shown = [f"{n} x ({text})" if n > 1 else f"({text})" for text, n in list(counts.items())[:3]]
    more = len(status.failed) - 3 if status.unit == "cells" else len(counts) - 3
    details = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    line = (f"sweep {study_name!r}: {status.done}/{status.total} {status.unit} finished, {len(status.failed)} "
            f"failed: {details}")
    if status.unit == "cells":
        given_up = len(status.failed) - status.retryable
        if status.retryable:
            line += (f". Running the same command again retries {status.retryable} of them (at most "
                     f"{MAX_CELL_ATTEMPTS} attempts per cell)")
        if given_up:
            line += (f". {given_up} failed {MAX_CELL_ATTEMPTS} times and are not retried: fix the cause and use a "
                     "new sweep.study_name")
    elif not status.complete:
        line += ". Running the same command again continues the study"
    return line
