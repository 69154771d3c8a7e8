"""`python -m pitsearch +sweep=NAME`: set up (or resume) the study and its MLflow parent run, run the workers,
keep the parent's summary fresh, report at the end.

Order matters: the whole sweep file is validated, then the MLflow store, the experiment, the study and the
parent run are created once, here, before any worker starts (SQLite and racing creators do not mix).

On a cluster every machine runs this same command against one database storage and one MLflow server: the
process that creates the study creates the parent run; the others wait for its id to appear in the study.
A server lost for longer than `sweep.retry_timeout_s` ends the command with one line and exit status 3.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pitsearch.experiment import to_container, validate_config
from pitsearch.masking import mask_url
from pitsearch.search.compose import TrialComposer
from pitsearch.search.preflight import check_sweep, preflight_configs
from pitsearch.search.rounds import RoundPrinter
from pitsearch.search.space import SEED_PATH
from pitsearch.search.spec import SweepSpec, parse_sweep
from pitsearch.search.trials import count_finished, count_running, failures_line, sweep_status
from pitsearch.search.worker import (EXIT_SERVICE_UNAVAILABLE, EXIT_TRIALS_FAILED, WorkerAbort, WorkerContext,
                                     budget_reached, reap_dead_workers, run_worker, worker_process_main)
from pitsearch.tracking import flatten

PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 30.0   # how long a joining machine waits for the study's creator to make the parent run


def config_paths(cfg: dict[str, Any]) -> list[str]:
    """Every path a search space may name: leaves and sections of the composed config (groups included)."""
    paths = set()
    for path in flatten({k: v for k, v in cfg.items() if k not in ("hydra", "sweep")}):
        parts = path.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(paths)


def run_sweep(cfg: Any, composer: TrialComposer | None = None) -> dict[str, Any]:
    from pitsearch.console import make_console

    # A lost server (ServiceUnavailable, WorkerAbort) propagates: `pitsearch.cli.guarded`, the one top-level
    # handler, prints its line (masked) and exits 3.
    return _run_sweep(cfg, composer, make_console())


def _run_sweep(cfg: Any, composer: TrialComposer | None, console) -> dict[str, Any]:
    from pitsearch.tracking import Tracker

    base_dir = os.getcwd()
    composer = composer or TrialComposer.from_hydra()
    cfg = to_container(cfg)
    known = config_paths(cfg)
    spec = parse_sweep(cfg["sweep"], known_paths=known, base_dir=base_dir)
    validate_config(cfg)
    # Every trial override must compose: a typo in the space fails now, not in trial 7. The composed examples
    # then go through a trial's checks (pitsearch.search.preflight): an objective no trial reports, or an error
    # every trial would hit, is one line now instead of a study of failed trials that the fixed command resumes.
    check_sweep(spec, *preflight_configs(spec, composer))   # with sweep.match: every variant solved

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    tracking_cfg = dict(cfg.get("tracking") or {})
    tracker = (Tracker.from_config(tracking_cfg, base_dir, retry_timeout_s=spec.retry_timeout_s)
               if tracking_cfg.get("enabled", True) else None)
    study, created = _create_or_join_study(spec)
    parent_run_id = _ensure_parent_run(study, spec, tracker, cfg, created) if tracker else None
    _requeue_lost_trials(study, tracker, parent_run_id, console)
    _retry_failed_cells(study, spec, console)

    status = sweep_status(study, spec)
    if status.complete and not status.running:
        console.print(f"study {spec.study_name!r} is complete: {status.done}/{status.total} {status.unit} finished; "
                      "nothing to train", markup=False, highlight=False)
        summary = _finish(study, spec, tracker, parent_run_id, console, interrupted=False, trained=False)
        return summary
    if not status.startable and not status.running:  # only cells that failed MAX_CELL_ATTEMPTS times are left
        summary = _finish(study, spec, tracker, parent_run_id, console, interrupted=False, trained=False)
        console.print(failures_line(spec.study_name, status, spec.space), markup=False, highlight=False)
        raise SystemExit(EXIT_TRIALS_FAILED)

    console.print(f"sweep {spec.study_name!r}: {'at most ' if spec.adaptive else ''}{spec.n_trials} trials, {len(worker_devices(spec, cfg['train'].get('device')))} "
                  f"worker(s), storage "
                  f"{mask_url(str(spec.storage or spec.output_dir / 'optuna-journal.log'))}"
                  + (f", MLflow {mask_url(tracker.uri)}" if tracker else ""), markup=False, highlight=False)
    contexts = _worker_contexts(spec, composer, cfg, known, base_dir, tracking_cfg, parent_run_id)
    monitor = _Monitor(study, spec, tracker, parent_run_id, console)
    monitor.start()
    interrupted = lost = False
    try:
        if len(contexts) == 1:
            run_worker(contexts[0], emit=console.print, tracker=tracker)
        else:
            lost = _run_processes(contexts, console)
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: the running trial is marked and will run again when this command is repeated")
    except WorkerAbort:
        lost = True
        raise
    finally:
        monitor.stop(refresh=not lost)
    if lost:
        raise SystemExit(EXIT_SERVICE_UNAVAILABLE)  # the workers said why
    summary = _finish(study, spec, tracker, parent_run_id, console, interrupted=interrupted, trained=True)
    status = sweep_status(study, spec)
    if status.failed and not status.running and not interrupted:
        # The last line says what failed and why; an unfinished sweep exits non-zero (a sweep whose every trial
        # failed must not look like a success to a script), a complete one with failures on the way does not.
        console.print(failures_line(spec.study_name, status, spec.space), markup=False, highlight=False)
        if not status.complete:
            raise SystemExit(EXIT_TRIALS_FAILED)
    return summary


def _retry_failed_cells(study, spec: SweepSpec, console) -> None:
    """A grid's failed cells run again when the sweep does (up to MAX_CELL_ATTEMPTS attempts per cell)."""
    if spec.sampler["name"] != "grid":
        return
    from pitsearch.search.grid import requeue_failed
    from pitsearch.search.rounds import opened_cells

    for failure in requeue_failed(study, spec.space, spec.sampler.get("seed"), opened_cells(spec)):
        values = spec.space.decode(failure.params or failure.system_attrs.get("fixed_params", {}))
        console.print(f"cell {' '.join(spec.space.to_overrides(values))} failed in trial {failure.number} "
                      f"({failure.user_attrs.get('fail_reason') or 'no reason recorded'}): queued again",
                      markup=False, highlight=False)


def _open_or_create_study(spec: SweepSpec):
    return _create_or_join_study(spec)[0]


def _create_or_join_study(spec: SweepSpec):
    """The study, and whether this process created it (and so owes it the MLflow parent run)."""
    import optuna

    from pitsearch.search.storage import make_storage
    from pitsearch.search.grid import seed_as_range
    from pitsearch.search.study import check_resumable, load_or_create_study, make_pruner, make_sampler

    storage = make_storage(spec.storage, spec.output_dir, heartbeat_interval=spec.heartbeat_interval_s,
                           retry_timeout_s=spec.retry_timeout_s)
    try:  # creating a study is atomic (its name is unique): exactly one racing machine gets created=True
        storage.create_new_study([optuna.study.StudyDirection[d.upper()] for d in spec.directions], spec.study_name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = load_or_create_study(spec.study_name, storage,
                                 make_sampler(spec.sampler, spec.space, len(spec.objectives),
                                              study_name=spec.study_name),
                                 make_pruner(spec.pruner, len(spec.objectives)), spec.directions)
    grid = spec.sampler["name"] == "grid"
    check_resumable(study, spec.space, grid=grid, seed_range=grid and seed_as_range(study))
    return study, created


def _requeue_lost_trials(study, tracker, parent_run_id: str | None, console) -> None:
    """Trials whose worker died (killed, power loss, silent heartbeat) are failed, their MLflow runs closed as
    FAILED, and their cells queued to run again. (A Ctrl-C'd trial was already failed and queued by its
    worker.) Then every child run still RUNNING whose trial is not running is closed (FAILED, unless its trial
    finished): runs of workers that lost the MLflow server, and runs whose worker was stopped (Ctrl-C, SIGKILL)
    between opening the run and recording it on the trial."""
    from optuna.trial import TrialState

    reap_dead_workers(study, tracker, lambda line: console.print(line, markup=False, highlight=False))
    if tracker is None or parent_run_id is None:
        return
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    for run_id, tags in tracker.running_children(parent_run_id):
        number = tags.get("trial_number", "")
        trial = trials.get(int(number)) if number.isdigit() else None
        if trial is not None and trial.state == TrialState.RUNNING:
            continue  # a live worker, here or on another machine
        if trial is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            closed = "FINISHED" if trial.state == TrialState.COMPLETE else "KILLED"
            tracker.set_tags(run_id, {"trial_state": trial.state.name})
            tracker.end_run(run_id, status=closed)
        else:
            reason = (trial.user_attrs.get("fail_reason") if trial is not None else None) or "its trial is not running"
            tracker.fail_run(run_id, reason)
            closed = f"FAILED ({reason})"
        console.print(f"MLflow run {run_id} (trial {number or '?'}) was left RUNNING: closed as {closed}",
                      markup=False, highlight=False)


def _ensure_parent_run(study, spec: SweepSpec, tracker, cfg: dict[str, Any], created: bool = True) -> str:
    """The study's one parent run: found through the study's user attributes, created if missing.

    Machines starting together: the one that created the study creates the run; the others wait (up to
    PARENT_WAIT_S) for its id to appear. A re-read after writing settles any remaining race.
    """
    import yaml

    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id and not created and not study.get_trials(deepcopy=False):
        deadline = time.monotonic() + PARENT_WAIT_S
        while not run_id and time.monotonic() < deadline:
            time.sleep(0.5)
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id and _run_exists(tracker, run_id):
        if tracker.run_status(run_id) != "RUNNING":
            tracker.set_run_status(run_id, "RUNNING")
        return run_id
    run_id = tracker.start_run(run_name=spec.study_name, tags={
        "pitsearch.kind": "sweep", "sweep": spec.study_name, "n_trials": spec.n_trials,
        "objectives": ", ".join(f"{m} ({d})" for m, d in spec.objectives),
        "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
        "storage": mask_url(str(spec.storage or spec.output_dir / "optuna-journal.log")),
        "mlflow.note.content": (f"Sweep `{spec.study_name}`: one child run per trial. In the runs table use "
                                "*Group by* on a swept tag (e.g. `model.pool`) to see each variant's mean curve "
                                "over seeds; `summary.md` and the report are this run's artifacts."),
    })
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    time.sleep(0.2)  # another machine may have raced us: the study's value wins, ours is dropped
    winner = study.user_attrs.get(PARENT_RUN_ATTR)  # a fresh read of the storage
    if winner != run_id and winner and _run_exists(tracker, winner):
        tracker.delete_run(run_id)
        return winner
    study.set_user_attr("mlflow_tracking_uri", mask_url(tracker.uri))
    study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
    tracker.log_text(run_id, yaml.safe_dump(spec.raw, sort_keys=False), "sweep.yaml")
    tracker.log_json(run_id, spec.space.describe(), "search_space.json")
    tracker.log_text(run_id, yaml.safe_dump({k: v for k, v in cfg.items() if k != "hydra"}, sort_keys=False),
                     "base_config.yaml")
    tracker.log_params(run_id, {f"sweep.{k}": v for k, v in flatten(spec.raw).items()})
    return run_id


def _run_exists(tracker, run_id: str) -> bool:
    return tracker.run_exists(run_id)


def worker_devices(spec: SweepSpec, train_device: str | None) -> list[str | None]:
    """One entry per worker: its pinned CUDA device, or None for a CPU worker.

    With CUDA and `train.device` auto/cuda: `sweep.trials_per_gpu` workers on each of `sweep.gpus` (default:
    every visible GPU, so CUDA_VISIBLE_DEVICES is respected). Otherwise `sweep.n_workers` CPU workers.
    """
    import torch

    if train_device in (None, "auto", "cuda") and torch.cuda.is_available():
        gpus = spec.gpus if spec.gpus is not None else list(range(torch.cuda.device_count()))
        return [f"cuda:{gpu}" for gpu in gpus for _ in range(spec.trials_per_gpu)]
    return [None] * spec.n_workers


def _worker_contexts(spec: SweepSpec, composer, cfg, known, base_dir, tracking_cfg, parent_run_id) -> list[WorkerContext]:
    contexts = []
    devices = worker_devices(spec, cfg["train"].get("device"))
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    for index, device in enumerate(devices):
        extra = []
        if device is not None:
            extra.append(f"train.device={device}")  # pinned: no two workers race for the freest GPU
        elif len(devices) > 1:
            extra.append(f"train.threads={threads}")  # split the cores; recorded in each trial's config
        if len(devices) > 1:
            extra.append("train.progress=false")
        contexts.append(WorkerContext(composer=composer, sweep_node=spec.raw, known_paths=known, base_dir=base_dir,
                                      tracking=tracking_cfg, parent_run_id=parent_run_id, worker_index=index,
                                      extra_overrides=extra))
    return contexts


def _run_processes(contexts: list[WorkerContext], console) -> bool:
    """Run one spawned process per worker; True when one of them lost a server (it printed why)."""
    import multiprocessing as mp
    import queue as queue_module

    spawn = mp.get_context("spawn")
    lines = spawn.Queue()
    processes = [spawn.Process(target=worker_process_main, args=(ctx, lines), name=f"pitsearch-worker-{ctx.worker_index}")
                 for ctx in contexts]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes) or not lines.empty():
            try:
                console.print(lines.get(timeout=0.5))
            except queue_module.Empty:
                pass
    except KeyboardInterrupt:
        for process in processes:  # they got SIGINT too; give them time to mark their trials
            process.join(timeout=30)
        raise
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
    return any(p.exitcode == EXIT_SERVICE_UNAVAILABLE for p in processes)


class _Monitor:
    """Polls the study: a progress bar (done / budget, best so far) and the parent run's live summary."""

    def __init__(self, study, spec: SweepSpec, tracker, parent_run_id, console, interval_s: float = 2.0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.study, self.spec, self.tracker, self.parent_run_id = study, spec, tracker, parent_run_id
        self.interval_s = interval_s
        # markup=False: a study name or a best variant holding brackets ("[1, 2, 1]", a path) is plain text.
        self.bar = Progress(TextColumn(f"sweep {spec.study_name}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[best]}", markup=False), TimeElapsedColumn(), console=console)
        self.task = self.bar.add_task("trials", total=spec.n_trials, best="")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last_finished = -1
        self.rounds = RoundPrinter(spec, lambda line: console.print(line, markup=False, highlight=False))

    def start(self) -> None:
        self.bar.start()
        self._thread.start()

    def stop(self, refresh: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if refresh:
            self.refresh()
        self.bar.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a monitor hiccup (e.g. a locked store) must not stop the sweep
                pass

    def refresh(self) -> None:
        from pitsearch.search.summary import best_text, log_parent_summary

        finished = count_finished(self.study)
        self.rounds(self.study)   # an adaptive grid's "round k: seed s added to ..." lines
        self.bar.update(self.task, completed=min(finished, self.spec.n_trials), best=best_text(self.study, self.spec))
        if finished != self._last_finished and self.tracker is not None:
            log_parent_summary(self.study, self.spec, self.tracker, self.parent_run_id)
        self._last_finished = finished


def _report_is_current(study, spec: SweepSpec, parent_run_id: str | None) -> bool:
    from pitsearch.report.publish import report_is_current
    from pitsearch.report.source import ReportSpec

    return report_is_current(study, ReportSpec.from_sweep(spec), parent_run_id)


def _finish(study, spec: SweepSpec, tracker, parent_run_id, console, interrupted: bool, trained: bool) -> dict[str, Any]:
    from pitsearch.search.summary import log_parent_summary, print_summary, trial_records

    if tracker is not None:
        log_parent_summary(study, spec, tracker, parent_run_id)
    complete = budget_reached(study, spec) and not count_running(study)
    # A rerun of a complete sweep writes the report when the last one is missing, was cut short by a kill, never
    # reached the parent run, or predates trials (pitsearch.report.publish records each finished report).
    if complete and spec.report and (trained or not _report_is_current(study, spec, parent_run_id)):
        from pitsearch.report import write_report

        write_report(study, spec, tracker=tracker, parent_run_id=parent_run_id, console=console)
        summary = {"records": trial_records(study)}
    else:
        summary = print_summary(study, spec, console)
    if tracker is not None:
        # An unfinished sweep's parent is KILLED (resuming sets it RUNNING again), unless workers elsewhere are
        # still at it: then it stays RUNNING, and the last machine to finish closes it.
        if complete and not interrupted:
            tracker.end_run(parent_run_id, status="FINISHED")
        elif not count_running(study):
            tracker.end_run(parent_run_id, status="KILLED")
        swept = [name for name in spec.space.names if name != SEED_PATH]
        group_by = "the tag " + " / ".join(swept) if swept else "the tag variant"
        console.print(f"MLflow parent run {parent_run_id} ({spec.study_name}) in {mask_url(tracker.uri)}; in the "
                      f"experiment's runs table, Group by {group_by} for each variant's mean curve over seeds",
                      markup=False, highlight=False)
        from pitsearch.report.publish import browse_line

        line = browse_line(study, spec, tracker, parent_run_id)   # the last line: one click to the report page
        if line is not None:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    summary["interrupted"] = interrupted
    return summary
