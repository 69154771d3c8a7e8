"""A sweep worker: ask a trial, compose its config, check its cost, train, tell. Repeat until the budget is met.

A worker is long-lived: imports, the CUDA context and the data upload are paid once, and trials run in-process
one after another. Whatever goes wrong inside a trial (bad config, over budget, NaN, out of memory, any
exception) ends that trial with its reason recorded; only Ctrl-C stops the worker, after marking the trial.

On a cluster, workers on many machines share one database storage and one MLflow server. A running trial beats
its heartbeat; before each ask a worker fails (and queues again) the trials of workers that died, here or on
another machine. A server that stays unreachable for `sweep.retry_timeout_s` ends the worker: its trial is
marked FAIL and queued again where the storage is reachable, and `WorkerAbort` carries one line to print.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# EXIT_SERVICE_UNAVAILABLE (3): a worker (and `python -m pitsearch`) that lost a server exits with it.
from pitsearch.cli import EXIT_SERVICE_UNAVAILABLE
from pitsearch.errors import ConfigError
from pitsearch.masking import mask_secrets, mask_url
from pitsearch.retry import ServiceUnavailable
from pitsearch.search.compose import TrialComposer
from pitsearch.search.match import TrialMatch
from pitsearch.search.rounds import ROUND_POLL_S, round_may_open
from pitsearch.search.storage import TrialHeartbeat
from pitsearch.search.trials import RetryStaleTrialCallback, mark_worker, tell
from pitsearch.train import StopRun

# A sweep that ended with failed cells or trials left (nothing running): its last line says which and why. Not 1,
# which pitsearch.cli keeps for bugs (a traceback), not 2 (bad input, nothing started), not 3 (a lost server).
EXIT_TRIALS_FAILED = 4


class WorkerAbort(RuntimeError):
    """A worker gave up on a server; the message is the one line to show."""


@dataclass
class WorkerContext:
    """Plain data, so a spawned process (or another machine) rebuilds the same worker."""

    composer: TrialComposer
    sweep_node: dict[str, Any]
    known_paths: list[str]
    base_dir: str
    tracking: dict[str, Any]
    parent_run_id: str | None
    worker_index: int = 0
    extra_overrides: list[str] = field(default_factory=list)   # e.g. train.threads=1, train.device=cuda:1


def open_study(spec, worker_index: int = 0):
    import optuna

    from pitsearch.search.storage import make_storage
    from pitsearch.search.study import make_pruner, make_sampler

    storage = make_storage(spec.storage, spec.output_dir, heartbeat_interval=spec.heartbeat_interval_s,
                           retry_timeout_s=spec.retry_timeout_s)
    return optuna.load_study(study_name=spec.study_name, storage=storage,
                             sampler=make_sampler(spec.sampler, spec.space, len(spec.objectives),
                                                  worker_index=worker_index, study_name=spec.study_name),
                             pruner=make_pruner(spec.pruner, len(spec.objectives)))


def budget_reached(study, spec) -> bool:
    """True when the sweep is complete: every cell of a grid finished (or `n_trials` of them), else `n_trials`
    trials (COMPLETE or PRUNED). Failed cells are not done (pitsearch.search.trials.sweep_status)."""
    from pitsearch.search.trials import sweep_status

    return sweep_status(study, spec).complete


def next_trial(study, spec):
    """The next trial for this worker, or None when nothing is left to start. A grid's cells are chosen by
    pitsearch.search.grid (pending cells, retries); other samplers draw, after any queued retry (`ask` pops it)."""
    from optuna.trial import TrialState

    if spec.sampler["name"] == "grid":
        import zlib

        from pitsearch.search.grid import next_grid_trial
        from pitsearch.search.rounds import opened_cells
        from pitsearch.search.trials import worker_id

        return next_grid_trial(study, spec.space, spec.sampler.get("seed"), spec.n_trials,
                               spec.output_dir / "grid.lock", offset=zlib.crc32(worker_id().encode()),
                               opened=opened_cells(spec))
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if finished >= spec.n_trials or (not waiting and finished + running >= spec.n_trials):
        return None  # trials other workers run count as handed out
    return _ask(study)


def run_worker(ctx: WorkerContext, emit: Callable[[str], None] = print, tracker=None) -> dict[str, int]:
    """The worker loop. Returns counts of trial states it produced. An in-process worker reuses the caller's
    `tracker` (opening an MLflow store costs about a second). Raises `WorkerAbort` when a server is lost."""
    import optuna

    from pitsearch.search.grid import seed_as_range
    from pitsearch.search.spec import parse_sweep
    from pitsearch.tracking import Tracker

    spec = parse_sweep(ctx.sweep_node, known_paths=ctx.known_paths, base_dir=ctx.base_dir)
    try:
        study = open_study(spec, ctx.worker_index)
        seed_range = spec.sampler["name"] == "grid" and seed_as_range(study)   # how the seed axis is stored
        if tracker is None and ctx.tracking.get("enabled", True):
            tracker = Tracker.from_config(ctx.tracking, ctx.base_dir, retry_timeout_s=spec.retry_timeout_s)
    except ServiceUnavailable as error:
        raise WorkerAbort(f"worker {ctx.worker_index}: {error}") from error
    datasets: dict[str, Any] = {}
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    while counts["FAIL"] < spec.max_failures:
        trial, run = None, {}
        try:
            reap_dead_workers(study, tracker, emit)
            trial = next_trial(study, spec)
            if trial is None and round_may_open(study, spec):
                time.sleep(ROUND_POLL_S)   # the round's last cells run elsewhere; their outcome may open cells
                continue
            if trial is None:
                break
            with TrialHeartbeat(study, trial._trial_id):
                state = _run_trial(trial, study, spec, ctx, tracker, datasets, emit, run, seed_range)
        except ServiceUnavailable as error:
            raise WorkerAbort(_abandon(trial, run.get("id"), study, tracker, ctx, error)) from error
        except optuna.exceptions.UpdateFinishedTrialError:
            if trial is None:
                raise
            # Another worker failed this trial while it ran (its heartbeat looked silent for longer than the
            # grace period) and queued its cell again; the copy runs elsewhere.
            emit(f"trial {trial.number:4d} was failed by another worker (missed heartbeats?); its cell is queued "
                 "again")
            state = "FAIL"
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

    with warnings.catch_warnings():  # the heartbeat is beaten by _Heartbeat, not by study.optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask(fixed_distributions)


def _abandon(trial, run_id: str | None, study, tracker, ctx: WorkerContext, error: ServiceUnavailable) -> str:
    """A server is gone: record what still can be recorded, on the server that is still there, and say so."""
    from optuna.trial import TrialState

    if trial is None:
        return f"worker {ctx.worker_index}: {error}"
    done = []
    lost_storage = error.service == "Optuna storage"
    if not lost_storage:
        try:
            trial.set_user_attr("fail_reason", str(error))
            frozen = tell(study, trial, state=TrialState.FAIL)
            RetryStaleTrialCallback(max_retry=None)(study, frozen)
            done.append("marked FAIL and queued again")
        except Exception:  # noqa: BLE001 - best effort; the heartbeat check of other workers catches it too
            pass
    if tracker is not None and run_id and error.service != "MLflow tracking server":
        try:
            tracker.fail_run(run_id, str(error))
        except Exception:  # noqa: BLE001
            pass
    if lost_storage:
        done.append("left to other workers' heartbeat check")
    return f"worker {ctx.worker_index}: trial {trial.number} {' and '.join(done) or 'not recorded'}: {error}"


def _run_trial(trial, study, spec, ctx: WorkerContext, tracker, datasets, emit, run: dict,
               seed_range: bool = False) -> str:
    """One trial, told. `run["id"]` gets its MLflow run id as soon as it exists. A server lost for good
    (here, or inside training, where run_experiment would record it as an ordinary failure) raises
    `ServiceUnavailable`."""
    from optuna.trial import TrialState

    from pitsearch.experiment import prepare, run_experiment

    started = time.perf_counter()
    mark_worker(trial)  # lets a later run tell a dead worker's trial from a live one
    values = spec.space.suggest(trial, seed_range=seed_range)
    variant = spec.space.variant_key(values)
    trial.set_user_attr("variant", variant)
    tags = {"sweep": spec.study_name, "trial_number": trial.number, "variant": variant,
            **{path: _tag_value(value) for path, value in values.items()}}
    run_name = f"{spec.study_name}-{trial.number:04d}"
    try:
        cfg = ctx.composer.compose(spec.space.to_overrides(values) + ctx.extra_overrides)
        trial.set_user_attr("seed", cfg["train"]["seed"])
        data_key = json.dumps([cfg["data"], cfg["train"].get("device")], sort_keys=True, default=str)
        # sweep.match: the model re-sized to the reference's cost once the data gave its shape
        matcher = TrialMatch(spec.match, variant) if spec.match is not None else None
        prepared = prepare(cfg, dataset=datasets.get(data_key), adjust_model=matcher)
        datasets[data_key] = prepared.dataset
        stats = prepared.stats
        trial.set_user_attr("config", mask_secrets(prepared.cfg))
        trial.set_user_attr("macs", stats["macs"])
        trial.set_user_attr("params", stats["params"])
        if matcher is not None:
            trial.set_user_attr("matched", matcher.user_attr())
            tags.update(matcher.tags())
        _check_budget(stats, spec.budget)
    except ConfigError as error:
        return _fail_untrained(trial, study, spec, tracker, ctx, run_name, tags, str(error), started, emit)

    objective_metric = spec.objectives[0][0]
    lost: list[ServiceUnavailable] = []

    def report_and_prune(epoch: int, metrics: dict[str, float]) -> None:
        if not spec.prunable or objective_metric not in metrics:
            return
        value = metrics[objective_metric]
        try:
            if value == value:  # NaN is never reported: a diverged run is stopped by the trainer itself
                trial.report(value, epoch)
            prune = trial.should_prune()
        except ServiceUnavailable as error:
            lost.append(error)
            raise
        if prune:
            raise StopRun(f"pruned at epoch {epoch} ({objective_metric}={value:.4f})", state="PRUNED")

    def run_started(run_id: str) -> None:
        run["id"] = run_id
        trial.set_user_attr("mlflow_run_id", run_id)

    give_ups = tracker.give_ups if tracker is not None else 0
    try:
        result = run_experiment(prepared.cfg, prepared=prepared, tracker=tracker, parent_run_id=ctx.parent_run_id,
                                run_name=run_name, tags=tags, callbacks=[report_and_prune],
                                on_run_started=run_started, params=matcher.params() if matcher else None)
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", "interrupted")
        frozen = tell(study, trial, state=TrialState.FAIL)
        RetryStaleTrialCallback(max_retry=None)(study, frozen)
        emit(f"trial {trial.number:4d} interrupted: marked FAIL and queued to run again on resume")
        raise
    finally:
        del prepared  # nothing of a finished trial may stay alive in a long-lived worker
        gc.collect()

    if tracker is not None and tracker.give_ups > give_ups:
        lost.append(tracker.last_give_up)
    if lost:
        raise lost[0]
    wall = time.perf_counter() - started
    final = result.final
    trial.set_user_attr("mlflow_run_id", result.run_id)
    trial.set_user_attr("history", result.history)
    trial.set_user_attr("final", final)
    trial.set_user_attr("train_seconds", result.train_seconds)
    trial.set_user_attr("eval_seconds", result.eval_seconds)
    trial.set_user_attr("wall_seconds", wall)
    if result.analysis.get("spatial"):   # the report overlays the variants' per-block profiles
        trial.set_user_attr("spatial", result.analysis["spatial"])
    if result.reason:
        trial.set_user_attr("fail_reason" if result.state == "FAILED" else "prune_reason", result.reason)
    if result.state == "COMPLETE":
        objective_values = [_objective_value(name, final, stats) for name, _ in spec.objectives]
        state = tell(study, trial, values=objective_values).state
    else:
        state = tell(study, trial, state=TrialState.PRUNED if result.state == "PRUNED" else TrialState.FAIL).state
    if tracker is not None and result.run_id:
        tracker.set_tags(result.run_id, {"trial_state": state.name})
    overhead = wall - result.train_seconds - result.eval_seconds
    shown = ", ".join(f"{name}={_fmt(_objective_value(name, final, stats))}" for name, _ in spec.objectives)
    emit(f"trial {trial.number:4d} {state.name:8s} {variant} seed={cfg['train']['seed']}  {shown}  "
         f"{wall:.1f}s (overhead {overhead:.1f}s)" + (f"  [{result.reason}]" if result.reason else ""))
    return state.name


def _check_budget(stats: dict[str, Any], budget: dict[str, Any]) -> None:
    for key, stat in (("max_macs", "macs"), ("max_params", "params")):
        limit = budget.get(key)
        if limit is not None and stats[stat] > limit:
            raise ConfigError(f"sweep.budget.{key}", f"over budget: {stat} {stats[stat]:,} > {int(limit):,}")


def _fail_untrained(trial, study, spec, tracker, ctx, run_name, tags, reason, started, emit) -> str:
    """A config that cannot or must not train: failed with its reason, visible in MLflow too."""
    from optuna.trial import TrialState

    trial.set_user_attr("fail_reason", reason)
    if tracker is not None:
        run_id = tracker.start_run(run_name=run_name, tags={**tags, "state": "FAILED", "reason": reason[:5000],
                                                            "trial_state": "FAIL"},
                                   parent_run_id=ctx.parent_run_id)
        tracker.end_run(run_id, status="FAILED")
        trial.set_user_attr("mlflow_run_id", run_id)
    tell(study, trial, state=TrialState.FAIL)
    emit(f"trial {trial.number:4d} FAIL     {tags['variant']}  {time.perf_counter() - started:.1f}s  [{reason}]")
    return "FAIL"


def _objective_value(name: str, final: dict[str, float], stats: dict[str, Any]) -> float:
    if name in ("macs", "params"):
        return float(stats[name])
    return float(final.get(name, float("nan")))


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _tag_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


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
