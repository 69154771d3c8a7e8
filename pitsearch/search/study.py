"""Optuna parts built from a sweep file: sampler, pruner, objectives, and the study itself.

Each swappable part is one table from name to class; a new sampler or pruner is one line. Keyword arguments
are checked against the class signature before construction, so a typo names `sweep.sampler.<key>`.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from pitsearch.errors import ConfigError
from pitsearch.search.overrides import to_plain
from pitsearch.search.space import SearchSpace
from pitsearch.urls import sqlite_path

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "grid": optuna.samplers.GridSampler,
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "gp": optuna.samplers.GPSampler,
    "bruteforce": optuna.samplers.BruteForceSampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "threshold": optuna.pruners.ThresholdPruner,
}
# Deprecated in Optuna 5 and gone in 6.0 (TPE's old knobs; every sampler's constraints_func -> set_constraint).
DEPRECATED_KWARGS = {
    "consider_prior", "prior_weight", "consider_magic_clip", "consider_endpoints", "gamma", "weights",
    "warn_independent_sampling", "constraints_func",
}
DIRECTIONS = ("maximize", "minimize")


# ---------------------------------------------------------------------------------------------- sampler, pruner


def make_sampler(
    cfg_sampler: Any, space: SearchSpace, n_objectives: int, *, study_name: str = ""
) -> optuna.samplers.BaseSampler:
    """Build `sweep.sampler`. Grid uses the same seed in every worker (the order of the cells is shuffled with
    it; pitsearch.search.grid picks the cells). A seeded sampler of any other kind is a `TrialSeededSampler`:
    each trial draws with a seed derived from the study name, `seed` and its trial number, so a resumed run,
    a second worker or a second machine draws new points, and a fresh run with the same seed draws the same
    (trial numbers are unique across workers and machines)."""
    name, kwargs = _name_and_kwargs(cfg_sampler, "sweep.sampler", SAMPLERS, default="tpe")
    if n_objectives < 1:
        raise ConfigError("sweep.objectives", "needs at least one objective")
    cls = SAMPLERS[name]
    seed = kwargs.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError("sweep.sampler.seed", f"must be an integer or null, got {seed!r}")
    if name == "grid":
        _check_kwargs(cls, kwargs, "sweep.sampler", supplied={"search_space"})
        kwargs["search_space"] = space.grid()
        kwargs["seed"] = seed if seed is not None else 0
    else:
        if name == "bruteforce":
            _check_enumerable(space)
        _check_kwargs(cls, kwargs, "sweep.sampler")
        if seed is not None:
            base = _construct(cls, {**kwargs, "seed": seed}, "sweep.sampler")  # surfaces bad kwargs now
            return TrialSeededSampler(cls, kwargs, seed, study_name, base)
    return _construct(cls, kwargs, "sweep.sampler")


def trial_seed(study_name: str, seed: int, trial_number: int) -> int:
    """A 32-bit seed for one trial: a hash, so neighbouring trial numbers do not get neighbouring streams."""
    digest = hashlib.sha256(f"{study_name}\0{seed}\0{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A seeded sampler that draws each trial with `trial_seed(study, seed, trial.number)`.

    A sampler seeded once per process repeats itself: a resumed sweep rebuilt it with the same seed and drew the
    same configurations again, and two machines (or two workers given the same seed) drew the same points at
    once. The trial number is assigned by the storage, unique across workers and machines, and counts the trials
    already in the study, so every trial gets its own stream, and a run is reproducible from its seed. The
    wrapped sampler is rebuilt for each trial (cheap: samplers keep their history in the study, not in
    themselves); `base` is the sampler built with `seed` itself, for inspection.
    """

    def __init__(self, cls: type, kwargs: dict[str, Any], seed: int, study_name: str,
                 base: optuna.samplers.BaseSampler):
        self._cls, self._kwargs, self._seed, self._study_name = cls, dict(kwargs), seed, study_name
        self.base = base
        self._number: int | None = None
        self._sampler = base

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number != self._number:
            self._number = trial.number
            self._sampler = _construct(self._cls, {**self._kwargs,
                                                   "seed": trial_seed(self._study_name, self._seed, trial.number)},
                                       "sweep.sampler")
        return self._sampler

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial: FrozenTrial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial: FrozenTrial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial: FrozenTrial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seeds come from the trial numbers; nothing to reseed
        pass


def make_pruner(cfg_pruner: Any, n_objectives: int) -> optuna.pruners.BasePruner:
    """Build `sweep.pruner`; Optuna cannot report or prune in multi-objective studies."""
    name, kwargs = _name_and_kwargs(cfg_pruner, "sweep.pruner", PRUNERS, default="none")
    if name != "none" and n_objectives > 1:
        raise ConfigError("sweep.pruner", "pruning needs a single objective; use name: none")
    cls = PRUNERS[name]
    _check_kwargs(cls, kwargs, "sweep.pruner")
    return _construct(cls, kwargs, "sweep.pruner")


def parse_objectives(node: Any) -> list[tuple[str, str]]:
    """`sweep.objectives` -> [(metric, direction), ...]."""
    node = to_plain(node)
    if not isinstance(node, list) or not node:
        raise ConfigError("sweep.objectives", "must be a non-empty list of {metric: ..., direction: ...}")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(node):
        field = f"sweep.objectives[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(field, f"must be a mapping {{metric: ..., direction: ...}}, got {item!r}")
        for key in item:
            if key not in ("metric", "direction"):
                raise ConfigError(f"{field}.{key}", "unknown key; valid: metric, direction")
        metric, direction = item.get("metric"), item.get("direction")
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"{field}.metric", "must be a non-empty string")
        if direction not in DIRECTIONS:
            raise ConfigError(f"{field}.direction", f"must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if metric in (m for m, _ in out):
            raise ConfigError(f"{field}.metric", f"{metric} is listed twice")
        out.append((metric, direction))
    return out


def _name_and_kwargs(node: Any, field: str, table: Mapping[str, type], default: str) -> tuple[str, dict]:
    node = to_plain(node)
    if node is None:
        node = {"name": default}
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, dict):
        raise ConfigError(field, f"must be a mapping with a name, got {node!r}")
    kwargs = dict(node)
    name = kwargs.pop("name", None)
    if name not in table:
        raise ConfigError(f"{field}.name", f"unknown {name!r}; valid: {', '.join(table)}")
    return name, kwargs


def _check_kwargs(cls: type, kwargs: Mapping[str, Any], field: str, supplied: set[str] = frozenset()) -> None:
    params = inspect.signature(cls).parameters
    valid = [p for p in params if p not in DEPRECATED_KWARGS and p not in supplied]
    for key in kwargs:
        if key in supplied:
            raise ConfigError(f"{field}.{key}", "set by pitsearch (from sweep.space); leave it out")
        if key in DEPRECATED_KWARGS and key in params:
            raise ConfigError(f"{field}.{key}", "deprecated in Optuna 5 and removed in 6.0; leave it out")
        if key not in params:
            raise ConfigError(f"{field}.{key}", f"not an argument of {cls.__name__}; valid: {', '.join(valid)}")
    for p in params.values():
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if p.name not in kwargs and p.name not in supplied:
                raise ConfigError(f"{field}.{p.name}", f"required by {cls.__name__}")


def _construct(cls: type, kwargs: dict, field: str) -> Any:
    try:
        with warnings.catch_warnings():  # BruteForceSampler, GPSampler: "experimental" since 3.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(field, f"{cls.__name__}: {e}") from None


def _check_enumerable(space: SearchSpace) -> None:
    for p in space.params:
        if p.kind == "float" and p.step is None:
            raise ConfigError(f"sweep.space.{p.path}", "bruteforce needs a step for float ranges")


def open_sweep_study(spec, *, create: bool = False) -> tuple[optuna.Study, bool]:
    """The one way a sweep opens its study: (study, whether this process created it).

    `create=True` (the command that starts or resumes a sweep): create the study, or join it when it exists,
    then refuse a space its stored trials cannot take (`check_resumable`). Creating is atomic (the name is
    unique), so exactly one of several racing machines gets created=True and owes the study its MLflow parent
    run. `create=False` (a worker): load the existing study. Either way with the sampler and pruner that
    `parse_sweep` built (once per process).
    (`python -m pitsearch.report` and `export` open a finished study read-only: `open_existing_study`.)"""
    from pitsearch.search.grid import seed_as_range
    from pitsearch.search.storage import make_storage

    storage = make_storage(spec.storage, spec.output_dir, heartbeat_interval=spec.heartbeat_interval_s,
                           retry_timeout_s=spec.retry_timeout_s)
    sampler, pruner = spec.optuna_sampler, spec.optuna_pruner
    if not create:
        return optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner), False
    try:
        storage.create_new_study([optuna.study.StudyDirection[d.upper()] for d in spec.directions], spec.study_name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = load_or_create_study(spec.study_name, storage, sampler, pruner, spec.directions)
    grid = spec.sampler["name"] == "grid"
    check_resumable(study, spec.space, grid=grid, seed_range=grid and seed_as_range(study))
    return study, created


class StudyNotFound(Exception):
    """The study or its storage does not exist; the CLIs print it as one line."""


def open_existing_study(study_name: str, storage: str | None = None, cwd: str | Path | None = None):
    """Load an existing study without writing anything: no journal, database or folder is created for a
    study that does not exist. Returns (study, storage_dir): the default journal's folder, or None."""
    from pitsearch.search.locations import default_sweep_dir, journal_file
    from pitsearch.search.storage import make_storage

    if storage is None:
        journal = journal_file(default_sweep_dir(study_name, cwd))
        if not journal.is_file():
            raise StudyNotFound(f"no study {study_name!r}: {journal} does not exist (give --storage URL or run "
                                "from the sweep's working directory)")
        storage_value, storage_dir = str(journal), journal.parent
    else:
        storage_value, storage_dir = storage, None
        _check_exists(storage)
    try:
        backend = make_storage(storage_value, Path(cwd or "."), heartbeat_interval=None)
    except ConfigError as error:
        raise StudyNotFound(str(error)) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=backend), storage_dir
    except KeyError:
        names = optuna.get_all_study_names(backend)
        known = f"; studies there: {', '.join(names)}" if names else "; it holds no study"
        raise StudyNotFound(f"no study {study_name!r} in {_masked(storage_value)}{known}") from None


def _check_exists(storage: str) -> None:
    """A journal path or sqlite URL must name an existing file (Optuna would create an empty one)."""
    if "://" not in storage:
        if not Path(storage).expanduser().is_file():
            raise StudyNotFound(f"storage {storage} does not exist")
    elif storage.startswith("sqlite"):
        path = sqlite_path(storage)
        if path is None or not path.expanduser().is_file():
            raise StudyNotFound(f"storage {storage} does not exist")


def _masked(url: str) -> str:
    from pitsearch.masking import mask_url

    return mask_url(url)


def load_or_create_study(
    study_name: str,
    storage: BaseStorage,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    directions: list[str],
) -> optuna.Study:
    """Create the study, or load it when it exists; its directions must match the objectives."""
    for d in directions:
        if d not in DIRECTIONS:
            raise ConfigError("sweep.objectives", f"direction must be one of {', '.join(DIRECTIONS)}, got {d!r}")
    study = optuna.create_study(
        study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
        directions=list(directions), load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != list(directions):
        raise ConfigError(
            "sweep.objectives",
            f"study {study_name!r} already exists with directions {existing}, but the objectives ask for "
            f"{list(directions)}; use a new sweep.study_name",
        )
    return study


def check_resumable(study: optuna.Study, space: SearchSpace, grid: bool, seed_range: bool) -> None:
    """Refuse, before anything is stored, a space the study's stored trials cannot take: Optuna fixes a
    parameter's kind (and a categorical's choices) at its first trial, and a grid can only grow by seeds (its
    other axes define which stored trials are which cells). One line, naming the key to change."""
    from optuna.distributions import CategoricalDistribution, check_distribution_compatibility

    from pitsearch.search.space import SEED_PATH

    trials = study.get_trials(deepcopy=False)
    stored: dict[str, Any] = {}
    for trial in trials:
        for name, distribution in trial.distributions.items():
            stored.setdefault(name, distribution)
    if not stored:
        return
    fix = f"use a new sweep.study_name (study {study.study_name!r} keeps its trials)"
    for name, distribution in space.distributions(seed_range).items():
        if name not in stored:
            continue
        try:
            check_distribution_compatibility(stored[name], distribution)
        except ValueError:
            field = "sweep.seeds" if name == SEED_PATH else f"sweep.space.{name}"
            was = stored[name]
            if isinstance(was, CategoricalDistribution):
                what = f"stores {name} with the choices {list(was.choices)}"
            else:
                what = f"stores {name} as {type(was).__name__}(low={was.low}, high={was.high}, log={was.log})"
            raise ConfigError(field, f"study {study.study_name!r} {what}, and Optuna cannot change a parameter's "
                                     f"kind or choices within a study; {fix}") from None
    if grid:
        # A running trial may be caught between two suggests (another machine is starting it): only finished
        # trials hold every axis of their grid; any trial may show an axis this grid lacks.
        axes = {name for trial in trials for name in trial.params}
        finished = [trial for trial in trials if trial.state.name in ("COMPLETE", "PRUNED")]
        missing = {name for trial in finished for name in space.names if name not in trial.params}
        if axes - set(space.names) or missing:
            stored = {name for trial in finished for name in trial.params} or axes
            raise ConfigError("sweep.space", f"study {study.study_name!r} is a grid over {', '.join(sorted(stored))};"
                                             f" this sweep's grid is over {', '.join(sorted(space.names))}; only "
                                             f"seeds can be added to a grid; {fix}")
