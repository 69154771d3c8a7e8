"""`python -m pitsearch +sweep=NAME`: set up (or resume) the study and its MLflow parent run, run the workers,
and end with a summary (the report, through the caller's reporter).

Order matters: the whole sweep file is validated, then the MLflow store, the experiment, the study and the
parent run are created once, here, before any worker starts (SQLite and racing creators do not mix).

On a cluster every machine runs this same command against one database storage and one MLflow server: the
process that creates the study creates the parent run; the others wait for its id to appear in the study.
A server lost for longer than `sweep.retry_timeout_s` ends the command with one line and exit status 3.

`search` never imports `report`: what is written about a sweep comes from a `SweepReporter` the caller passes
(`python -m pitsearch` passes `pitsearch.report.sweep.StudyReporter`). Modules by job: `trial` (one trial),
`worker` (the loop), `processes` (worker processes, the monitor), `parent` (the MLflow parent run), here (order).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from pitsearch.cli import EXIT_SERVICE_UNAVAILABLE, EXIT_TRIALS_FAILED
from pitsearch.masking import mask_url
from pitsearch.search.compose import TrialComposer
from pitsearch.search.parent import close_orphan_runs, close_parent, ensure_parent_run
from pitsearch.search.preflight import check_sweep, preflight_configs
from pitsearch.search.processes import Monitor, run_processes
from pitsearch.search.space import SEED_PATH
from pitsearch.search.spec import SweepSpec, parse_sweep
from pitsearch.search.storage import storage_label
from pitsearch.search.study import open_sweep_study
from pitsearch.search.trial import WorkerAbort, WorkerContext
from pitsearch.search.trials import count_running, failures_line, sweep_status
from pitsearch.search.worker import reap_dead_workers, run_worker
from pitsearch.tracking import flatten


class SweepReporter(Protocol):
    """What a sweep says about its study, supplied by the caller (pitsearch.report.sweep.StudyReporter)."""

    def progress(self, study, spec) -> str:
        """A few words for the progress bar (the best trial so far)."""

    def refresh(self, study, spec, tracker, parent_run_id: str) -> None:
        """The parent run's live summary, as trials finish."""

    def finish(self, study, spec, tracker, parent_run_id: str | None, console, *, complete: bool,
               trained: bool) -> dict[str, Any]:
        """The end: the report (a complete sweep) or a summary table; returns {"records": ...}."""

    def browse_line(self, study, spec, tracker, parent_run_id: str) -> str | None:
        """The sweep's last line: one click to the report."""


def config_paths(cfg: dict[str, Any]) -> list[str]:
    """Every path a search space may name: leaves and sections of the composed config (groups included)."""
    paths = set()
    for path in flatten({k: v for k, v in cfg.items() if k not in ("hydra", "sweep")}):
        parts = path.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(paths)


def run_sweep(cfg: Any, composer: TrialComposer | None = None, reporter: SweepReporter | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep of `cfg`; `reporter` writes what is said about it (None: nothing but lines).
    A lost server (ServiceUnavailable, WorkerAbort) propagates: `pitsearch.cli.guarded`, the one top-level
    handler, prints its line (masked) and exits 3."""
    from pitsearch.console import make_console

    return _run_sweep(cfg, composer, make_console(), reporter)


def _run_sweep(cfg: Any, composer: TrialComposer | None, console, reporter: SweepReporter | None) -> dict[str, Any]:
    from pitsearch.experiment import to_container, validate_config
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
    study, created = open_sweep_study(spec, create=True)
    parent_run_id = ensure_parent_run(study, spec, tracker, cfg, created) if tracker else None
    # Trials whose worker died (killed, power loss, silent heartbeat) are failed, their MLflow runs closed as
    # FAILED, and their cells queued to run again (a Ctrl-C'd trial was already failed and queued by its worker).
    say = _printer(console)
    reap_dead_workers(study, tracker, say)
    if tracker is not None and parent_run_id is not None:
        close_orphan_runs(study, tracker, parent_run_id, say)
    _retry_failed_cells(study, spec, console)

    status = sweep_status(study, spec)
    if status.complete and not status.running:
        console.print(f"study {spec.study_name!r} is complete: {status.done}/{status.total} {status.unit} finished; "
                      "nothing to train", markup=False, highlight=False)
        return finish_sweep(study, spec, tracker, parent_run_id, console, reporter, interrupted=False, trained=False)
    if not status.startable and not status.running:  # only cells that failed MAX_CELL_ATTEMPTS times are left
        finish_sweep(study, spec, tracker, parent_run_id, console, reporter, interrupted=False, trained=False)
        console.print(failures_line(spec.study_name, status, spec.space), markup=False, highlight=False)
        raise SystemExit(EXIT_TRIALS_FAILED)

    console.print(f"sweep {spec.study_name!r}: {'at most ' if spec.adaptive else ''}{spec.n_trials} trials, {len(worker_devices(spec, cfg['train'].get('device')))} "
                  f"worker(s), storage "
                  f"{storage_label(spec.storage, spec.output_dir)}"
                  + (f", MLflow {mask_url(tracker.uri)}" if tracker else ""), markup=False, highlight=False)
    contexts = _worker_contexts(spec, composer, cfg, known, base_dir, tracking_cfg, parent_run_id)
    monitor = Monitor(study, spec, tracker, parent_run_id, console, reporter)
    monitor.start()
    interrupted = lost = False
    try:
        if len(contexts) == 1:
            run_worker(contexts[0], emit=console.print, tracker=tracker, spec=spec, study=study)
        else:
            lost = run_processes(contexts, console)
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
    summary = finish_sweep(study, spec, tracker, parent_run_id, console, reporter, interrupted=interrupted,
                           trained=True)
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


def finish_sweep(study, spec: SweepSpec, tracker, parent_run_id, console, reporter: SweepReporter | None,
                 interrupted: bool, trained: bool) -> dict[str, Any]:
    """The summary or report (the reporter's), the parent run closed, and the sweep's last lines."""
    complete = sweep_status(study, spec).complete and not count_running(study)
    summary = (reporter.finish(study, spec, tracker, parent_run_id, console, complete=complete, trained=trained)
               if reporter is not None else {})
    if tracker is not None:
        close_parent(tracker, parent_run_id, complete=complete, interrupted=interrupted, running=count_running(study))
        swept = [name for name in spec.space.names if name != SEED_PATH]
        group_by = "the tag " + " / ".join(swept) if swept else "the tag variant"
        console.print(f"MLflow parent run {parent_run_id} ({spec.study_name}) in {mask_url(tracker.uri)}; in the "
                      f"experiment's runs table, Group by {group_by} for each variant's mean curve over seeds",
                      markup=False, highlight=False)
        line = reporter.browse_line(study, spec, tracker, parent_run_id) if reporter is not None else None
        if line is not None:   # the last line: one click to the report page
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    summary["interrupted"] = interrupted
    return summary


def _printer(console):
    return lambda line: console.print(line, markup=False, highlight=False)
