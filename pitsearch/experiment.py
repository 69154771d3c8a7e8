"""One experiment, top to bottom: config -> validate -> data -> model -> stats -> MLflow run -> train -> result.

`python -m pitsearch` runs one; the sweep engine runs one per trial (reusing the loaded dataset and the
tracker). A run that fails or is stopped still ends its MLflow run, marked, with the reason as a tag.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from pitsearch.errors import ConfigError
from pitsearch.retry import ServiceUnavailable
from pitsearch.runstate import RunState, StopRun
from pitsearch.train import EpochCallback


@dataclass
class Prepared:
    """Everything known about a run before training starts."""

    cfg: dict[str, Any]          # resolved config, model dims filled from the data
    model: Any
    dataset: Any
    stats: dict[str, Any]


@dataclass
class ExperimentResult:
    state: RunState
    history: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    reason: str | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    compile_seconds: float = 0.0
    wall_seconds: float = 0.0
    analysis: dict[str, Any] = field(default_factory=dict)   # run_analyses(): {"metrics", "spatial"}
    out_of_memory: bool = False  # failed for want of device memory (a pack that did not fit: search.trial)

    @property
    def final(self) -> dict[str, float]:
        """Last value of every curve, plus the post-training analyses' scalars (robust/*, spatial/*)."""
        return {**{k: v[-1] for k, v in self.history.items() if v}, **self.analysis.get("metrics", {})}


def to_container(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Checks that need no data loaded: one-line `ConfigError`s naming the field."""
    from pitsearch.data import validate_data_config
    from pitsearch.train import validate_train_config

    for section in ("model", "data", "train"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(section, "missing config section")
    from pitsearch.analysis import validate_eval_config

    validate_data_config(cfg["data"])
    validate_train_config(cfg["train"], cfg["data"].get("aug"))
    validate_eval_config(cfg.get("eval"))
    tracking = cfg.get("tracking") or {}
    if tracking.get("enabled", True) and tracking.get("uri"):
        from pitsearch.tracking import check_tracking_uri

        check_tracking_uri(tracking["uri"])   # MLflow would object only after the data load


def fill_model_from_data(model_cfg: Mapping[str, Any], dataset) -> dict[str, Any]:
    """img_size / in_chans / num_classes come from the data unless the user set them."""
    filled = dict(model_cfg)
    for key, value in (("img_size", dataset.img_size), ("in_chans", dataset.in_chans),
                       ("num_classes", dataset.num_classes)):
        if filled.get(key) is None:
            filled[key] = value
    if filled["in_chans"] != dataset.in_chans:
        raise ConfigError("model.in_chans", f"is {filled['in_chans']} but data {dataset.name!r} has {dataset.in_chans} channels")
    if filled["img_size"] != dataset.img_size:
        raise ConfigError("model.img_size", f"is {filled['img_size']} but data {dataset.name!r} images are {dataset.img_size}px")
    return filled


def prepare(cfg: Any, dataset=None,
            adjust_model: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Prepared:
    """Validate, load data (unless given), build the model and count its cost, all before any training.

    `adjust_model` gets the model config once the data filled in its size, channels and classes, and returns
    the one to build: a sweep's compute matching (pitsearch.search.match) needs the real data's shape."""
    import torch

    from pitsearch.data import load_dataset
    from pitsearch.models import build_model, resolve_model_config
    from pitsearch.profile import model_stats
    from pitsearch.train import resolve_device

    cfg = to_container(cfg)
    validate_config(cfg)
    device = resolve_device(cfg["train"].get("device"))
    if cfg["train"].get("threads") and device.type == "cpu":
        torch.set_num_threads(int(cfg["train"]["threads"]))
    if dataset is None:
        dataset = load_dataset(cfg["data"], device=device)
    model_cfg = fill_model_from_data(cfg["model"], dataset)
    cfg["model"] = resolve_model_config(adjust_model(model_cfg) if adjust_model is not None else model_cfg)
    torch.manual_seed(int(cfg["train"]["seed"]))  # model init depends on the seed only
    model = build_model(cfg["model"])
    stats = model_stats(model, cfg["model"]["img_size"])
    return Prepared(cfg=cfg, model=model.to(device), dataset=dataset, stats=stats)


def run_tags(cfg: Mapping[str, Any], dataset) -> dict[str, Any]:
    """Tags the MLflow UI can group and filter by."""
    return {
        "model": cfg["model"].get("name") or "custom",
        "pool": cfg["model"]["pool"],
        "dataset": dataset.name,
        "seed": cfg["train"]["seed"],
        "synthetic_data": str(bool(dataset.synthetic)).lower(),
    }


@dataclass
class RunRequest:
    """One run to make: a prepared model and how its MLflow run is named, tagged and told about."""

    prepared: Prepared
    run_name: str | None = None
    tags: Mapping[str, Any] | None = None
    callbacks: Sequence[EpochCallback] = ()
    on_run_started: Callable[[str], None] | None = None   # a sweep records the run id before training
    params: Mapping[str, Any] | None = None               # logged beside the config's (a sweep's `matched.*`)


def run_experiment(cfg: Any, *, prepared: Prepared | None = None, tracker=None, parent_run_id: str | None = None,
                   run_name: str | None = None, tags: Mapping[str, Any] | None = None,
                   callbacks: Iterable[EpochCallback] = (), console=None,
                   on_run_started: Callable[[str], None] | None = None,
                   params: Mapping[str, Any] | None = None) -> ExperimentResult:
    """Train once and log everything. Returns; only KeyboardInterrupt (after ending the run) and a lost server
    (`ServiceUnavailable`: not this run's failure, the caller decides what becomes of it) propagate.

    `on_run_started(run_id)` lets a sweep record the MLflow run before training, so a run whose worker is
    killed can still be found and closed later. `params`: logged beside the config's (a sweep's `matched.*`).
    """
    request = RunRequest(prepared or prepare(cfg), run_name, tags, tuple(callbacks), on_run_started, params)
    return _run([request], tracker, parent_run_id, console)[0]


def run_packed_experiments(requests: Sequence[RunRequest], *, tracker=None,
                           parent_run_id: str | None = None) -> list[ExperimentResult]:
    """`run_experiment` for runs of one architecture and recipe trained together as one pack (pitsearch.packed):
    each keeps its own MLflow run, curves, analyses and state. A member that is pruned, diverges or fails ends
    alone; an error of the shared step (e.g. out of memory) fails every member still training."""
    return _run(list(requests), tracker, parent_run_id, None)


def _run(requests: list[RunRequest], tracker, parent_run_id: str | None, console) -> list[ExperimentResult]:
    from pitsearch.train import TrainResult, train_model

    started = time.perf_counter()
    results = [ExperimentResult(state=RunState.FAILED, reason="not started", stats=r.prepared.stats,
                                cfg=r.prepared.cfg) for r in requests]
    trains = [TrainResult() for _ in requests]
    outcomes: list[Any] = []
    try:
        # Runs are opened inside the guarded block: a Ctrl-C while a config is being logged still ends them.
        for request, result in zip(requests, results):
            if tracker is not None:
                _open_run(tracker, request, result, parent_run_id)
        callbacks = [[_epoch_logger(tracker, result.run_id), *request.callbacks]
                     for request, result in zip(requests, results)]
        first = requests[0].prepared
        if len(requests) == 1:
            outcomes = [train_model(first.model, first.dataset, first.cfg["train"], first.cfg["data"].get("aug"),
                                    callbacks=callbacks[0], console=console, result=trains[0])]
        else:
            from pitsearch.packed import train_packed

            outcomes = train_packed([r.prepared.model for r in requests], first.dataset,
                                    [r.prepared.cfg["train"] for r in requests], first.cfg["data"].get("aug"),
                                    callbacks, results=trains)
    except StopRun as stop:
        outcomes = [stop]
    except ServiceUnavailable:
        raise   # a sweep gives the trials back (pitsearch.search.trial); a single run exits 3 (pitsearch.cli)
    except KeyboardInterrupt:
        _end_interrupted(tracker, results, trains)
        raise
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, not fatal to a sweep; a pack's shared
        outcomes = [error] * len(requests)   # step failed: every member with it
    ended = 0
    try:
        for request, result, train, outcome in zip(requests, results, trains, outcomes):
            _settle(result, outcome, request.prepared, tracker)
            result.wall_seconds = time.perf_counter() - started
            _log_end(tracker, result.run_id, result, train)
            ended += 1
    except KeyboardInterrupt:   # during an analysis: the runs not yet ended are ended as interrupted
        _end_interrupted(tracker, results[ended:], trains[ended:])
        raise
    return results


def _end_interrupted(tracker, results: list[ExperimentResult], trains: list) -> None:
    for result, train in zip(results, trains):
        result.state, result.reason = RunState.FAILED, "interrupted (Ctrl-C)"
        _log_end(tracker, result.run_id, result, train)


def _open_run(tracker, request: RunRequest, result: ExperimentResult, parent_run_id: str | None) -> None:
    cfg = request.prepared.cfg
    result.run_id = tracker.start_run(run_name=request.run_name or cfg.get("tracking", {}).get("run_name"),
                                      tags={**run_tags(cfg, request.prepared.dataset), **(request.tags or {})},
                                      parent_run_id=parent_run_id)
    if request.on_run_started is not None:
        request.on_run_started(result.run_id)
    _log_start(tracker, result.run_id, cfg, request.prepared.stats, request.params)


def _epoch_logger(tracker, run_id: str | None) -> EpochCallback:
    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if math.isfinite(v)}, step=epoch)

    return log_epoch


def _settle(result: ExperimentResult, outcome: Any, prepared: Prepared, tracker) -> None:
    """A run's state from how its training ended; a run trained to the end is analysed (an analysis error fails
    it with its reason)."""
    if isinstance(outcome, StopRun):
        result.state, result.reason = outcome.state, outcome.reason
        return
    if isinstance(outcome, Exception):
        result.state, result.reason = RunState.FAILED, f"{type(outcome).__name__}: {outcome}"
        if _is_cuda_oom(outcome):
            result.out_of_memory = True
            _release_cuda_memory()
        return
    from pitsearch.analysis import run_analyses

    try:
        result.analysis = run_analyses(prepared.model, prepared.dataset, prepared.cfg.get("eval"), tracker=tracker,
                                       run_id=result.run_id)
        result.state, result.reason = RunState.COMPLETE, None
    except ServiceUnavailable:
        raise
    except Exception as error:  # noqa: BLE001
        result.state, result.reason = RunState.FAILED, f"{type(error).__name__}: {error}"


def _log_start(tracker, run_id: str, cfg: Mapping[str, Any], stats: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> None:
    import yaml

    from pitsearch.tracking import flatten

    params = {k: v for k, v in flatten(cfg).items() if not k.startswith(("hydra.", "sweep."))}
    params.update({"model.params_count": stats["params"], "model.macs": stats["macs"], **(extra or {})})
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, {"model/params": stats["params"], "model/macs": stats["macs"]}, step=0)
    tracker.log_text(run_id, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    tracker.log_json(run_id, stats, "model_stats.json")


def _log_end(tracker, run_id, result: ExperimentResult, train) -> None:
    result.history = train.history
    result.train_seconds, result.eval_seconds = train.train_seconds, train.eval_seconds
    result.compile_seconds = train.compile_seconds
    if tracker is None or run_id is None:
        return
    from pitsearch.plots import run_curves_figure

    tags = {"state": result.state.value}
    if result.compile_seconds:
        tracker.log_metrics(run_id, {"time/compile_s": result.compile_seconds}, step=0)
    if result.reason:
        tags["reason"] = result.reason[:5000]
    tracker.set_tags(run_id, tags)
    if result.history and any(result.history.values()):
        import matplotlib.pyplot as plt

        figure = run_curves_figure({"run": result.history})
        tracker.log_figure(run_id, figure, "curves.png")
        plt.close(figure)
    tracker.end_run(run_id, status=result.state.mlflow_status)


def _is_cuda_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(error)


def _release_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_single(cfg: Any) -> ExperimentResult:
    """`python -m pitsearch`: validate, train once, log to MLflow, print the result and where to see it."""
    from pitsearch.console import make_console

    from pitsearch.masking import mask_url
    from pitsearch.tracking import Tracker

    console = make_console()
    prepared = prepare(cfg)  # every config error surfaces here, before a run exists
    cfg = prepared.cfg
    stats = prepared.stats
    console.print(f"model {cfg['model'].get('name') or 'custom'} (pool={cfg['model']['pool']}): "
                  f"{stats['params']:,} params, {stats['macs'] / 1e6:.2f} M MACs, grids "
                  f"{' -> '.join(s['grid'] for s in stats['stages'])}; data {prepared.dataset.name}: "
                  f"{len(prepared.dataset.train_y)} train / {len(prepared.dataset.val_y)} val; "
                  f"device {prepared.dataset.train_x.device}")
    tracker = Tracker.from_config(cfg["tracking"]) if cfg.get("tracking", {}).get("enabled", True) else None
    result = run_experiment(cfg, prepared=prepared, tracker=tracker, console=console)
    final = result.final
    console.print(f"{result.state}: val/acc_best {final.get('val/acc_best', float('nan')):.4f}, "
                  f"train {result.train_seconds:.1f}s + eval {result.eval_seconds:.1f}s, "
                  f"wall {result.wall_seconds:.1f}s" + (f" ({result.reason})" if result.reason else ""))
    if tracker is not None:
        console.print(f"MLflow run {result.run_id} in {mask_url(tracker.uri)}")
        line = tracker.browse_line(tracker.run_url(result.run_id))   # the run page, Model-training view
        if line is not None:
            console.print(line, soft_wrap=True)
    if result.state == RunState.FAILED:
        raise SystemExit(1)
    return result
