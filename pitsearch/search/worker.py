"""A sweep worker: ask a trial (or a pack of them), run it (pitsearch.search.trial.run_trials), repeat until done.

A worker is long-lived: imports, the CUDA context and the data upload are paid once, and trials run in-process
one after another. Whatever goes wrong inside a trial (bad config, over budget, NaN, out of memory, any
exception) ends that trial with its reason recorded; only Ctrl-C stops the worker, after marking the trial.

On a cluster, workers on many machines share one database storage and one MLflow server. A running trial beats
its heartbeat; before each ask a worker fails (and queues again) the trials of workers that died, here or on
another machine. A server that stays unreachable for `sweep.retry_timeout_s` ends the worker: its trial is
marked FAIL and queued again where the storage is reachable, and `WorkerAbort` carries one line to print.
"""

from __future__ import annotations

import time
from typing import Callable

# EXIT_SERVICE_UNAVAILABLE (3): a worker (and `python -m pitsearch`) that lost a server exits with it.
from pitsearch.cli import EXIT_SERVICE_UNAVAILABLE
from pitsearch.errors import ConfigError
from pitsearch.masking import mask_url
from pitsearch.retry import ServiceUnavailable
from pitsearch.search.rounds import ROUND_POLL_S, round_may_open
from pitsearch.search.pack import pack_capacity, take_pack
from pitsearch.search.trial import TrialRun, WorkerAbort, WorkerContext, run_trials


def next_trial(study, spec):
    """The next trial for this worker, or None when nothing is left to start. A grid's cells are chosen by
    pitsearch.search.grid (pending cells, retries); other samplers draw, after any queued retry (`ask` pops it)."""
    from optuna.trial import TrialState

    from pitsearch.search.trials import count_finished, count_running

    if spec.sampler["name"] == "grid":
        import zlib

        from pitsearch.search.grid import next_grid_trial
        from pitsearch.search.rounds import opened_cells
        from pitsearch.search.trials import worker_id

        return next_grid_trial(study, spec.space, spec.sampler.get("seed"), spec.n_trials,
                               spec.output_dir / "grid.lock", offset=zlib.crc32(worker_id().encode()),
                               opened=opened_cells(spec))
    finished, running = count_finished(study), count_running(study)
    waiting = bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if finished >= spec.n_trials or (not waiting and finished + running >= spec.n_trials):
        return None  # trials other workers run count as handed out
    return _ask(study)


def run_worker(ctx: WorkerContext, emit: Callable[[str], None] = print, tracker=None, spec=None,
               study=None) -> dict[str, int]:
    """The worker loop. Returns counts of trial states it produced. An in-process worker reuses the caller's
    `tracker` (opening an MLflow store costs about a second), `spec` and `study` (the sampler is built once per
    process). Raises `WorkerAbort` when a server is lost."""
    from pitsearch.search.grid import seed_as_range
    from pitsearch.search.spec import parse_sweep
    from pitsearch.search.study import open_sweep_study
    from pitsearch.tracking import Tracker

    if spec is None or study is None:
        spec = parse_sweep(ctx.sweep_node, known_paths=ctx.known_paths, base_dir=ctx.base_dir)
        study = None
    try:
        study = study or open_sweep_study(spec)[0]
        if tracker is None and ctx.tracking.get("enabled", True):
            tracker = Tracker.from_config(ctx.tracking, ctx.base_dir, retry_timeout_s=spec.retry_timeout_s)
        run = TrialRun(spec=spec, ctx=ctx, tracker=tracker, emit=emit,
                       seed_range=spec.sampler["name"] == "grid" and seed_as_range(study))
    except ServiceUnavailable as error:
        raise WorkerAbort(f"worker {ctx.worker_index}: {error}") from error
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    while counts["FAIL"] < spec.max_failures:
        try:
            reap_dead_workers(study, tracker, emit)
            trial = next_trial(study, spec)
            # sweep.pack: more cells of this trial's variant, trained with it as one model
            trials = take_pack(study, run, trial, pack_capacity(trial, run)) if trial is not None else []
        except ServiceUnavailable as error:
            raise WorkerAbort(f"worker {ctx.worker_index}: {error}") from error
        if trial is None and round_may_open(study, spec):
            time.sleep(ROUND_POLL_S)   # the round's last cells run elsewhere; their outcome may open cells
            continue
        if trial is None:
            break
        for state in run_trials(trials, study, run):
            counts[state] = counts.get(state, 0) + 1
    if counts["FAIL"] >= spec.max_failures:
        emit(f"worker {ctx.worker_index}: stopping after {counts['FAIL']} failed trials (sweep.max_failures)")
    return counts


def reap_dead_workers(study, tracker, emit: Callable[[str], None] = print) -> list:
    """Fail and queue again the trials of dead workers (a local pid that is gone, or a silent heartbeat on
    any machine), and close their MLflow runs as FAILED. Returns the failed trials."""
    from pitsearch.search.trials import fail_stale_running

    failed = fail_stale_running(study)
    for trial in failed:
        emit(f"trial {trial.number:4d} was left RUNNING by a dead worker ({trial.user_attrs.get('fail_reason')}): "
             "marked FAIL, queued again")
        run_id = trial.user_attrs.get("mlflow_run_id")
        if tracker is not None and run_id and tracker.run_exists(run_id):
            tracker.fail_run(run_id, "worker died")
    return failed


def _ask(study, fixed_distributions=None):
    import warnings

    with warnings.catch_warnings():  # the heartbeat is beaten by TrialHeartbeat, not by study.optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask(fixed_distributions)


def worker_process_main(ctx: WorkerContext, queue) -> None:
    """Entry of a spawned worker process: its lines go to the parent, which prints them."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_worker(ctx, emit=queue.put)
    except KeyboardInterrupt:
        pass
    except ConfigError as error:
        queue.put(f"error: {mask_url(str(error))}")
    except WorkerAbort as error:
        queue.put(f"error: {mask_url(str(error))}")
        sys.exit(EXIT_SERVICE_UNAVAILABLE)
