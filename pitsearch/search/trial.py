"""One trial, in one function: suggest -> compose -> prepare -> run -> state -> tell -> record.

`run_trial` is the only place where a trial's outcome becomes its state (in the spirit of Optuna's `_run_trial`):

| what happened                                  | trial        | MLflow run | worker                    |
|------------------------------------------------|--------------|------------|---------------------------|
| trained to the end                             | COMPLETE     | FINISHED   | goes on                   |
| pruned, NaN loss                               | PRUNED       | KILLED     | goes on                   |
| bad config, over budget, any exception         | FAIL         | FAILED     | goes on                   |
| Ctrl-C                                         | FAIL, queued | FAILED     | stops (KeyboardInterrupt) |
| a server lost for `sweep.retry_timeout_s`      | FAIL, queued | FAILED     | stops (`WorkerAbort`)     |
| another worker failed it meanwhile             | (theirs)     | -          | goes on                   |

Run states are `pitsearch.runstate.RunState`; the table from it to Optuna's and MLflow's names lives there.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pitsearch.errors import ConfigError
from pitsearch.masking import mask_secrets
from pitsearch.retry import ServiceUnavailable
from pitsearch.runstate import RunState, StopRun
from pitsearch.search.compose import TrialComposer
from pitsearch.search.grid import INTERRUPTED
from pitsearch.search.match import TrialMatch
from pitsearch.search.storage import TrialHeartbeat
from pitsearch.search.trials import RetryStaleTrialCallback, mark_worker, tell


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


@dataclass
class TrialRun:
    """What one worker keeps between its trials: the sweep, the MLflow tracker, the loaded data sets."""

    spec: Any
    ctx: WorkerContext
    tracker: Any = None
    seed_range: bool = False          # how the study stores a grid's seed axis (pitsearch.search.grid)
    datasets: dict[str, Any] = field(default_factory=dict)
    emit: Callable[[str], None] = print


def run_trial(trial, study, run: TrialRun) -> str:
    """Run `trial` (already asked) to its end and tell the study; returns the Optuna state's name.

    Raises KeyboardInterrupt (after marking the trial FAIL and queueing it again) and `WorkerAbort` (a server
    lost for good, with the line that says what was recorded where)."""
    import optuna

    spec, ctx, tracker = run.spec, run.ctx, run.tracker
    started = time.perf_counter()
    mark_worker(trial)   # lets a later run tell a dead worker's trial from a live one
    values = spec.space.suggest(trial, seed_range=run.seed_range)
    variant = spec.space.variant_key(values)
    tags = {"sweep": spec.study_name, "trial_number": trial.number, "variant": variant,
            **{path: _tag_value(value) for path, value in values.items()}}
    run_name = f"{spec.study_name}-{trial.number:04d}"
    run_id: str | None = None
    seed = result = stats = None
    try:
        with TrialHeartbeat(study, trial._trial_id):
            trial.set_user_attr("variant", variant)
            try:
                prepared, matcher = _prepare(trial, run, values, variant, tags)
            except ConfigError as error:   # cannot or must not train: failed with its reason, in MLflow too
                run_id = _record_untrained(trial, run, run_name, tags, str(error))
                state, reason = RunState.FAILED, str(error)
            else:
                stats, seed = prepared.stats, prepared.cfg["train"]["seed"]

                def run_started(new_run_id: str) -> None:
                    nonlocal run_id
                    run_id = new_run_id
                    trial.set_user_attr("mlflow_run_id", new_run_id)

                from pitsearch.experiment import run_experiment

                try:
                    result = run_experiment(prepared.cfg, prepared=prepared, tracker=tracker,
                                            parent_run_id=ctx.parent_run_id, run_name=run_name, tags=tags,
                                            callbacks=[_pruning_callback(trial, spec)], on_run_started=run_started,
                                            params=matcher.params() if matcher else None)
                finally:
                    del prepared   # nothing of a finished trial may stay alive in a long-lived worker
                    gc.collect()
                state, reason = result.state, result.reason
            _record(trial, state, reason, result, time.perf_counter() - started)
            frozen = tell(study, trial, state=state.trial_state,
                          values=_objective_values(spec, result, stats) if state == RunState.COMPLETE else None)
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", INTERRUPTED)
        RetryStaleTrialCallback(max_retry=None)(study, tell(study, trial, state=RunState.FAILED.trial_state))
        run.emit(f"trial {trial.number:4d} interrupted: marked FAIL and queued to run again on resume")
        raise
    except ServiceUnavailable as error:
        raise WorkerAbort(_abandon(trial, run_id, study, run, error)) from error
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another worker failed this trial while it ran (its heartbeat looked silent for longer than the grace
        # period) and queued its cell again; the copy runs elsewhere.
        run.emit(f"trial {trial.number:4d} was failed by another worker (missed heartbeats?); its cell is queued "
                 "again")
        return RunState.FAILED.trial_state_name
    if tracker is not None and run_id:
        tracker.set_tags(run_id, {"trial_state": frozen.state.name})
    run.emit(_result_line(trial, frozen.state.name, variant, seed, spec, result, stats, reason,
                          time.perf_counter() - started))
    return frozen.state.name


def _prepare(trial, run: TrialRun, values: dict[str, Any], variant: str, tags: dict[str, Any]):
    """The trial's config composed, checked, its data loaded (once per worker) and its model built."""
    from pitsearch.experiment import prepare

    spec = run.spec
    cfg = run.ctx.composer.compose(spec.space.to_overrides(values) + run.ctx.extra_overrides)
    trial.set_user_attr("seed", cfg["train"]["seed"])
    data_key = json.dumps([cfg["data"], cfg["train"].get("device")], sort_keys=True, default=str)
    # sweep.match: the model re-sized to the reference's cost once the data gave its shape
    matcher = TrialMatch(spec.match, variant) if spec.match is not None else None
    prepared = prepare(cfg, dataset=run.datasets.get(data_key), adjust_model=matcher)
    run.datasets[data_key] = prepared.dataset
    trial.set_user_attr("config", mask_secrets(prepared.cfg))
    trial.set_user_attr("macs", prepared.stats["macs"])
    trial.set_user_attr("params", prepared.stats["params"])
    if matcher is not None:
        trial.set_user_attr("matched", matcher.user_attr())
        tags.update(matcher.tags())
    _check_budget(prepared.stats, spec.budget)
    return prepared, matcher


def _pruning_callback(trial, spec) -> Callable[[int, dict[str, float]], None]:
    objective_metric = spec.objectives[0][0]

    def report_and_prune(epoch: int, metrics: dict[str, float]) -> None:
        if not spec.prunable or objective_metric not in metrics:
            return
        value = metrics[objective_metric]
        if value == value:  # NaN is never reported: a diverged run is stopped by the trainer itself
            trial.report(value, epoch)
        if trial.should_prune():
            raise StopRun(f"pruned at epoch {epoch} ({objective_metric}={value:.4f})", state=RunState.PRUNED)

    return report_and_prune


def _record(trial, state: RunState, reason: str | None, result, wall: float) -> None:
    """The user attributes the report reads (pitsearch.report.summary.trial_records)."""
    if result is not None:
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("history", result.history)
        trial.set_user_attr("final", result.final)
        trial.set_user_attr("train_seconds", result.train_seconds)
        trial.set_user_attr("eval_seconds", result.eval_seconds)
        trial.set_user_attr("wall_seconds", wall)
        if result.analysis.get("spatial"):   # the report overlays the variants' per-block profiles
            trial.set_user_attr("spatial", result.analysis["spatial"])
    if reason:
        trial.set_user_attr("fail_reason" if state == RunState.FAILED else "prune_reason", reason)


def _record_untrained(trial, run: TrialRun, run_name: str, tags: dict[str, Any], reason: str) -> str | None:
    """A config that never trained still gets its child run, FAILED with the reason, so MLflow shows it."""
    if run.tracker is None:
        return None
    run_id = run.tracker.start_run(run_name=run_name, tags={**tags, "state": RunState.FAILED.value,
                                                            "reason": reason[:5000]},
                                   parent_run_id=run.ctx.parent_run_id)
    run.tracker.end_run(run_id, status=RunState.FAILED.mlflow_status)
    trial.set_user_attr("mlflow_run_id", run_id)
    return run_id


def _abandon(trial, run_id: str | None, study, run: TrialRun, error: ServiceUnavailable) -> str:
    """A server is gone: record what still can be recorded, on the server that is still there, and say so."""
    done = []
    lost_storage = error.service == "Optuna storage"
    if not lost_storage:
        try:
            trial.set_user_attr("fail_reason", str(error))
            frozen = tell(study, trial, state=RunState.FAILED.trial_state)
            RetryStaleTrialCallback(max_retry=None)(study, frozen)
            done.append("marked FAIL and queued again")
        except Exception:  # noqa: BLE001 - best effort; the heartbeat check of other workers catches it too
            pass
    if run.tracker is not None and run_id and error.service != "MLflow tracking server":
        try:
            run.tracker.fail_run(run_id, str(error))
        except Exception:  # noqa: BLE001
            pass
    if lost_storage:
        done.append("left to other workers' heartbeat check")
    return f"worker {run.ctx.worker_index}: trial {trial.number} {' and '.join(done) or 'not recorded'}: {error}"


def _check_budget(stats: dict[str, Any], budget: dict[str, Any]) -> None:
    for key, stat in (("max_macs", "macs"), ("max_params", "params")):
        limit = budget.get(key)
        if limit is not None and stats[stat] > limit:
            raise ConfigError(f"sweep.budget.{key}", f"over budget: {stat} {stats[stat]:,} > {int(limit):,}")


def _objective_values(spec, result, stats: dict[str, Any]) -> list[float]:
    return [_objective_value(name, result.final, stats) for name, _ in spec.objectives]


def _objective_value(name: str, final: dict[str, float], stats: dict[str, Any]) -> float:
    if name in ("macs", "params"):
        return float(stats[name])
    return float(final.get(name, float("nan")))


def _result_line(trial, state: str, variant: str, seed, spec, result, stats, reason: str | None, wall: float) -> str:
    if result is None:   # never trained
        return f"trial {trial.number:4d} {state:8s} {variant}  {wall:.1f}s  [{reason}]"
    overhead = wall - result.train_seconds - result.eval_seconds
    shown = ", ".join(f"{name}={_fmt(_objective_value(name, result.final, stats))}" for name, _ in spec.objectives)
    return (f"trial {trial.number:4d} {state:8s} {variant} seed={seed}  {shown}  {wall:.1f}s (overhead "
            f"{overhead:.1f}s)" + (f"  [{reason}]" if reason else ""))


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _tag_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
