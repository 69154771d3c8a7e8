"""Grid sweeps: pitsearch, not Optuna's GridSampler, decides which cells are left to run.

GridSampler hands trial k cell k and counts a FAIL as visited, so a failed cell never ran again; and it matches
trials by their recorded search space, so a grid that grew (more seeds) re-ran every finished cell. Here the
study's trials are read as cells (`SearchSpace.cell_key`, the one cell identity) and every cell is in one of
these states:

- finished: it has a COMPLETE or PRUNED trial;
- busy: a trial of it is RUNNING, or queued (a live WAITING trial, see below);
- failed: it only has FAIL trials. Failures are retried when the sweep is run again (`requeue_failed`), not in
  the run that saw them (a deterministic failure would only burn its retries), and a cell gets at most
  MAX_CELL_ATTEMPTS attempts, so a broken cell cannot loop forever;
- pending: no trial yet.

A worker starts a cell by queueing it (`enqueue_trial`: the cell is stored atomically with the trial's number)
and popping a queued trial (WAITING -> RUNNING, atomic in every storage: one popper wins). Two queuers that
raced (machines sharing a database) may queue one cell twice: of a cell's queued trials only the first one in
trial order after its last failure is live (the earlier trial always exists when the later one is read, so
racers agree). The queuer of a copy that is not live sees it right after queueing and closes it as FAIL with
`duplicate` set (such trials are ignored here), so it is never run and never left WAITING. On one machine
the queueing is serialised by a lock file, and each worker takes pending cells from its own offset, which keeps
such races rare.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from pitsearch.filelock import file_lock
from pitsearch.search.space import SEED_PATH, SearchSpace
from pitsearch.search.trials import FINISHED_STATES

# Attempts per cell (the first run and 2 retries), as for trials of dead workers. A Ctrl-C'd attempt is not
# counted: the user stopped it, the cell did not fail.
MAX_CELL_ATTEMPTS = 3
INTERRUPTED = "interrupted"   # the fail_reason of a Ctrl-C'd trial
DUPLICATE = "duplicate"       # user attr of a racing copy closed without running
QUEUE_TOKEN = "queue_token"   # user attr: lets a queuer find the trial it queued
LOCK_WAIT_S = 30.0            # a lock file on a network file system that never answers: go on without it
# The cells of the grid that exist so far, from the study's trials: an adaptive grid opens seeds in rounds
# (pitsearch.search.rounds.opened_cells). None: every cell of the space exists from the start.
Opened = Callable[[list[FrozenTrial]], set[frozenset]] | None


@dataclass
class GridState:
    """The study's trials read as cells of the current grid (see the module docstring)."""

    cells: list[frozenset]                                  # every cell, in the order they are started
    params: dict[frozenset, dict[str, Any]]                 # cell -> stored (encoded) params
    finished: set[frozenset] = field(default_factory=set)
    busy: set[frozenset] = field(default_factory=set)
    failures: dict[frozenset, list[FrozenTrial]] = field(default_factory=dict)   # counted FAIL trials
    last_fail: dict[frozenset, FrozenTrial] = field(default_factory=dict)
    # live WAITING trials as (cell, trial), in trial order
    queued: list[tuple[frozenset, FrozenTrial]] = field(default_factory=list)
    stale: list[FrozenTrial] = field(default_factory=list)   # WAITING copies that never run

    @property
    def done(self) -> int:
        return sum(cell in self.finished for cell in self.cells)

    @property
    def pending(self) -> list[frozenset]:
        return [c for c in self.cells if c not in self.finished and c not in self.busy and c not in self.last_fail]

    @property
    def failed(self) -> list[frozenset]:
        """Cells of the grid that only failed so far (none of their trials is running or queued)."""
        return [c for c in self.cells if c in self.last_fail and c not in self.finished and c not in self.busy]

    def attempts(self, cell: frozenset) -> int:
        return len(self.failures.get(cell, ()))

    def retryable(self, cell: frozenset) -> bool:
        return self.attempts(cell) < MAX_CELL_ATTEMPTS


def grid_cells(space: SearchSpace, seed: int | None) -> tuple[list[frozenset], dict[frozenset, dict]]:
    """The grid's cells, shuffled with the grid sampler's seed as GridSampler did (with n_trials below the grid
    size, the cells that run are spread over the grid), and each cell's stored params."""
    params = {}
    for values in space.iter_cells():
        encoded = space.encode(values)
        params[space.cell_key(encoded)] = encoded
    cells = sorted(params, key=lambda c: sorted(c))   # a stable order before the shuffle
    random.Random(seed or 0).shuffle(cells)
    return cells, params


def trial_cell(trial: FrozenTrial, space: SearchSpace) -> frozenset:
    """The cell a trial runs: its params, or (a queued trial) the params it was queued with."""
    return space.cell_key({**trial.system_attrs.get("fixed_params", {}), **trial.params})


def grid_state(study: optuna.Study, space: SearchSpace, seed: int | None, opened: Opened = None) -> GridState:
    cells, params = grid_cells(space, seed)
    trials = study.get_trials(deepcopy=False)
    if opened is not None:   # a subset of the same shuffled cells: every guarantee below holds for it unchanged
        exist = opened(trials)
        cells = [cell for cell in cells if cell in exist]
    state = GridState(cells=cells, params=params)
    by_cell: dict[frozenset, list[FrozenTrial]] = {}
    for trial in trials:
        if not trial.user_attrs.get(DUPLICATE):
            by_cell.setdefault(trial_cell(trial, space), []).append(trial)
    for cell, trials in by_cell.items():
        taken = False
        for trial in sorted(trials, key=lambda t: t.number):
            if trial.state in FINISHED_STATES:
                state.finished.add(cell)
                taken = True
            elif trial.state == TrialState.RUNNING:
                state.busy.add(cell)
                taken = True
            elif trial.state == TrialState.FAIL:
                state.last_fail[cell] = trial
                if trial.user_attrs.get("fail_reason") != INTERRUPTED:
                    state.failures.setdefault(cell, []).append(trial)
            elif trial.state == TrialState.WAITING:
                # Live: the cell's first queued trial, or the retry of its latest failure. A copy queued by a
                # racing machine (or a retry of an older failure) is never popped.
                last = state.last_fail.get(cell)
                if not taken and (last is None or trial.user_attrs.get("retry_of") == last.number):
                    state.queued.append((cell, trial))
                    state.busy.add(cell)
                    taken = True
                else:
                    state.stale.append(trial)
    state.queued.sort(key=lambda item: item[1].number)
    return state


def grid_complete(state: GridState, n_trials: int) -> bool:
    """Every cell finished (or `sweep.n_trials` of them, when it is set below the grid size)."""
    return state.done >= min(n_trials, len(state.cells))


def next_grid_trial(study: optuna.Study, space: SearchSpace, seed: int | None, n_trials: int,
                    lock_path: Path | None, offset: int = 0, opened: Opened = None,
                    accept: Callable[[frozenset], bool] | None = None) -> optuna.Trial | None:
    """The next trial for a worker to run: a queued trial (a retry, or a cell queued by another worker), else
    a pending cell (the `offset`-th, so that machines queueing at once mostly pick different cells); None when
    nothing is left to start in this run (failed cells wait for the next run). `accept`: only cells it accepts
    (the other members of a pack, pitsearch.search.pack)."""
    with _local_lock(lock_path):
        state = grid_state(study, space, seed, opened)
        trial = _pop(study, state, accept)
        if trial is not None:
            return trial
        pending = [cell for cell in state.pending if accept is None or accept(cell)]
        if not pending or state.done + len(state.busy) >= n_trials:
            return None
        state = _queue(study, space, seed, state.params[pending[offset % len(pending)]], {}, opened)
        return _pop(study, state, accept)   # this cell, or an older queued trial of another machine


def requeue_failed(study: optuna.Study, space: SearchSpace, seed: int | None = None,
                   opened: Opened = None) -> list[FrozenTrial]:
    """Queue one more attempt of every failed cell that has attempts left; returns the failures retried.
    Called once when a sweep (re)starts: a failure is retried by the next run, not by the one that saw it."""
    state = grid_state(study, space, seed, opened)
    retried = []
    for cell in state.failed:
        if state.retryable(cell):
            last = state.last_fail[cell]
            _queue(study, space, seed, state.params[cell], {"retry_of": last.number}, opened)
            retried.append(last)
    return retried


def _queue(study: optuna.Study, space: SearchSpace, seed: int | None, params: dict[str, Any],
           user_attrs: dict[str, Any], opened: Opened = None) -> GridState:
    """Queue a cell; if a racing machine queued it first, close this copy (see the module docstring)."""
    token = uuid.uuid4().hex
    study.enqueue_trial(params, user_attrs={**user_attrs, QUEUE_TOKEN: token})
    state = grid_state(study, space, seed, opened)
    for copy in state.stale:
        if copy.user_attrs.get(QUEUE_TOKEN) == token:
            _close_duplicate(study, copy)
    return state


def _close_duplicate(study: optuna.Study, trial: FrozenTrial) -> None:
    storage = study._storage
    try:  # popped first, so that no one else can: then closed as a FAIL the bookkeeping ignores
        if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
            storage.set_trial_user_attr(trial._trial_id, DUPLICATE, True)
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "not run: another machine queued the same "
                                                                        "cell at the same moment")
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _pop(study: optuna.Study, state: GridState,
         accept: Callable[[frozenset], bool] | None = None) -> optuna.Trial | None:
    """WAITING -> RUNNING on the first live queued trial whose cell has attempts left: atomic in the storage, so
    of two workers popping the same trial one wins and the other moves on (as `Study.ask` pops)."""
    for cell, queued in state.queued:
        if not state.retryable(cell) or (accept is not None and not accept(cell)):
            continue
        try:
            if study._storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, queued._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


@contextlib.contextmanager
def _local_lock(path: Path | None) -> Iterator[None]:
    """Serialise queueing among the workers of one machine (they share the output folder). Without flock, or
    past LOCK_WAIT_S, the live/stale rule of the module docstring still keeps each cell to one run."""
    if path is None:
        yield
        return
    with file_lock(path, timeout_s=LOCK_WAIT_S):
        yield


def seed_as_range(study: optuna.Study) -> bool:
    """Whether this grid study stores the seed axis as an int range (so seeds can be added). Studies made by an
    older pitsearch stored it as a categorical; they keep it (Optuna refuses to change a parameter's kind)."""
    from optuna.distributions import CategoricalDistribution

    for trial in study.get_trials(deepcopy=False):
        if SEED_PATH in trial.distributions:
            return not isinstance(trial.distributions[SEED_PATH], CategoricalDistribution)
    return True
