"""One trial (or one pack of trials), in one function: suggest -> compose -> prepare -> run -> state -> tell -> record.

`run_trials` is the only place where a trial's outcome becomes its state (in the spirit of Optuna's `_run_trial`).
A pack (pitsearch.search.pack) goes through it whole: its members train as one model, and each member gets its
own row of this table:

| what happened                                  | trial        | MLflow run | worker                    |
|------------------------------------------------|--------------|------------|---------------------------|
| trained to the end                             | COMPLETE     | FINISHED   | goes on                   |
| pruned, NaN loss                               | PRUNED       | KILLED     | goes on                   |
| bad config, over budget, any exception         | FAIL         | FAILED     | goes on                   |
| Ctrl-C                                         | FAIL, queued | FAILED     | stops (KeyboardInterrupt) |
| a server lost for `sweep.retry_timeout_s`      | FAIL, queued | FAILED     | stops (`WorkerAbort`)     |
| another worker failed it meanwhile             | (theirs)     | -          | goes on                   |
| its pack ran out of memory                     | as above     | a new run  | goes on (trains it alone) |

Run states are `pitsearch.runstate.RunState`; the table from it to Optuna's and MLflow's names lives there.
"""

from __future__ import annotations

import contextlib
import copy
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
    pack_cap: int | None = None       # set when a pack ran out of memory: later packs hold at most this many
    last_config: tuple[list[str], dict[str, Any]] | None = None   # compose_trial's last (overrides, config)


@dataclass
class _Member:
    """One trial on its way through `run_trials`."""

    trial: Any
    values: dict[str, Any]
    variant: str
    tags: dict[str, Any]
    run_name: str
    run_id: str | None = None
    prepared: Any = None
    matcher: Any = None
    stats: dict[str, Any] | None = None
    seed: Any = None
    result: Any = None
    state: RunState | None = None
    reason: str | None = None
    frozen: Any = None          # the told trial
    taken: bool = False         # another worker failed it meanwhile (missed heartbeats)

    def run_started(self, run_id: str) -> None:
        self.run_id = run_id
        self.trial.set_user_attr("mlflow_run_id", run_id)


def run_trials(trials: list, study, run: TrialRun) -> list[str]:
    """Run `trials` (already asked: one, or a pack of one architecture, pitsearch.search.pack) to their end and
    tell the study; returns each trial's Optuna state name (FAIL for one another worker took over).

    Raises KeyboardInterrupt (after marking the trials still running FAIL and queueing them again) and
    `WorkerAbort` (a server lost for good, with the line that says what was recorded where)."""
    started = time.perf_counter()
    members: list[_Member] = []
    try:
        members += [_member(trial, run) for trial in trials]
        with contextlib.ExitStack() as heartbeats:
            for member in members:
                heartbeats.enter_context(TrialHeartbeat(study, member.trial._trial_id))
            for member in members:
                with _taken_by_another_worker(member, run):
                    member.trial.set_user_attr("variant", member.variant)
                    try:
                        member.prepared, member.matcher = _prepare(member.trial, run, member.values, member.variant,
                                                                   member.tags)
                        member.stats, member.seed = member.prepared.stats, member.prepared.cfg["train"]["seed"]
                    except ConfigError as error:   # cannot or must not train: failed with its reason, in MLflow too
                        member.run_id = _record_untrained(member.trial, run, member.run_name, member.tags, str(error))
                        member.state, member.reason = RunState.FAILED, str(error)
            _train([m for m in members if m.prepared is not None and not m.taken], run)
            for member in (m for m in members if not m.taken):
                with _taken_by_another_worker(member, run):
                    _record(member.trial, member.state, member.reason, member.result, time.perf_counter() - started)
                    member.frozen = tell(study, member.trial, state=member.state.trial_state,
                                         values=(_objective_values(run.spec, member.result, member.stats)
                                                 if member.state == RunState.COMPLETE else None))
    except KeyboardInterrupt:
        for trial, member in _unfinished(trials, members):
            trial.set_user_attr("fail_reason", INTERRUPTED)
            RetryStaleTrialCallback(max_retry=None)(study, tell(study, trial, state=RunState.FAILED.trial_state))
            run.emit(f"trial {trial.number:4d} interrupted: marked FAIL and queued to run again on resume")
        raise
    except ServiceUnavailable as error:
        lines = [_abandon(trial, member.run_id if member else None, study, run, error)
                 for trial, member in _unfinished(trials, members)]
        raise WorkerAbort("; ".join(lines) or f"worker {run.ctx.worker_index}: {error}") from error
    states = []
    for member in members:
        if member.taken:
            states.append(RunState.FAILED.trial_state_name)
            continue
        if run.tracker is not None and member.run_id:
            run.tracker.set_tags(member.run_id, {"trial_state": member.frozen.state.name})
        run.emit(_result_line(member.trial, member.frozen.state.name, member.variant, member.seed, run.spec,
                              member.result, member.stats, member.reason, time.perf_counter() - started)
                 + (f"  (pack of {len(members)})" if len(members) > 1 else ""))
        states.append(member.frozen.state.name)
    return states


def _unfinished(trials: list, members: list[_Member]):
    """(trial, its member or None) for each trial neither told nor taken over by another worker."""
    by_number = {member.trial.number: member for member in members}
    for trial in trials:
        member = by_number.get(trial.number)
        if member is None or (member.frozen is None and not member.taken):
            yield trial, member


def _member(trial, run: TrialRun) -> _Member:
    spec = run.spec
    mark_worker(trial)   # lets a later run tell a dead worker's trial from a live one
    values = spec.space.suggest(trial, seed_range=run.seed_range)
    variant = spec.space.variant_key(values)
    tags = {"sweep": spec.study_name, "trial_number": trial.number, "variant": variant,
            **{path: _tag_value(value) for path, value in values.items()}}
    return _Member(trial, values, variant, tags, run_name=f"{spec.study_name}-{trial.number:04d}")


def _train(members: list[_Member], run: TrialRun) -> None:
    """One run, or a pack trained as one model; each member gets its result and state."""
    if not members:
        return
    from pitsearch.experiment import RunRequest, run_packed_experiments

    requests = [RunRequest(m.prepared, run_name=m.run_name, tags=m.tags,
                           callbacks=[_pruning_callback(m.trial, run.spec)], on_run_started=m.run_started,
                           params=m.matcher.params() if m.matcher else None) for m in members]
    try:
        results = run_packed_experiments(requests, tracker=run.tracker, parent_run_id=run.ctx.parent_run_id)
        short = [i for i, result in enumerate(results) if result.out_of_memory]
        if len(requests) > 1 and short:
            # The pack did not fit: the members it held still have the weights they were built with, so they train
            # again one at a time (new MLflow runs; the failed ones stay FAILED), and later packs are halved.
            run.pack_cap = max(1, len(requests) // 2)
            run.emit(f"a pack of {len(requests)} trials ran out of memory: {len(short)} of them train again one at a "
                     f"time; packs of at most {run.pack_cap} from now on")
            for i in short:
                results[i] = run_packed_experiments([requests[i]], tracker=run.tracker,
                                                    parent_run_id=run.ctx.parent_run_id)[0]
    finally:
        for member in members:
            member.prepared = None   # nothing of a finished trial may stay alive in a long-lived worker
        del requests
        gc.collect()
    for member, result in zip(members, results):
        member.result, member.state, member.reason = result, result.state, result.reason


@contextlib.contextmanager
def _taken_by_another_worker(member: _Member, run: TrialRun):
    """Marks the member `taken` when a write to its trial finds it failed by another worker (its heartbeat
    looked silent for longer than the grace period, and its cell is queued again: the copy runs elsewhere)."""
    import optuna

    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        member.taken = True
        run.emit(f"trial {member.trial.number:4d} was failed by another worker (missed heartbeats?); its cell is "
                 "queued again")


def _prepare(trial, run: TrialRun, values: dict[str, Any], variant: str, tags: dict[str, Any]):
    """The trial's config composed, checked, its data loaded (once per worker) and its model built."""
    from pitsearch.experiment import prepare

    spec = run.spec
    cfg = compose_trial(run, values)
    trial.set_user_attr("seed", cfg["train"]["seed"])
    # sweep.match: the model re-sized to the reference's cost once the data gave its shape
    matcher = TrialMatch(spec.match, variant) if spec.match is not None else None
    prepared = prepare(cfg, dataset=run.datasets.get(_data_key(cfg)), adjust_model=matcher)
    run.datasets[_data_key(cfg)] = prepared.dataset
    trial.set_user_attr("config", mask_secrets(prepared.cfg))
    trial.set_user_attr("macs", prepared.stats["macs"])
    trial.set_user_attr("params", prepared.stats["params"])
    if matcher is not None:
        trial.set_user_attr("matched", matcher.user_attr())
        tags.update(matcher.tags())
    _check_budget(prepared.stats, spec.budget)
    return prepared, matcher


def compose_trial(run: TrialRun, values: dict[str, Any]) -> dict[str, Any]:
    """The trial's config: the sweep's, with the trial's values and the worker's overrides. The last one is kept
    (a copy is returned): a pack's first trial is composed to size its pack, then again to train (76 ms each)."""
    overrides = run.spec.space.to_overrides(values) + run.ctx.extra_overrides
    if run.last_config is None or run.last_config[0] != overrides:
        run.last_config = (overrides, run.ctx.composer.compose(overrides))
    return copy.deepcopy(run.last_config[1])


def worker_dataset(cfg: dict[str, Any], run: TrialRun):
    """The trial's data set, loaded once per worker (validated first)."""
    from pitsearch.data import load_dataset, validate_data_config
    from pitsearch.train import resolve_device

    key = _data_key(cfg)
    if key not in run.datasets:
        validate_data_config(cfg["data"])
        run.datasets[key] = load_dataset(cfg["data"], device=resolve_device(cfg["train"].get("device")))
    return run.datasets[key]


def _data_key(cfg: dict[str, Any]) -> str:
    return json.dumps([cfg["data"], cfg["train"].get("device")], sort_keys=True, default=str)


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
