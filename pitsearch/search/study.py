"""Optuna parts built from a sweep file: sampler, pruner, objectives, and the study itself.

Each swappable part is one table from name to class; a new sampler or pruner is one line. Keyword arguments
are checked against the class signature before construction, so a typo names `sweep.sampler.<key>`.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage

from pitsearch.errors import ConfigError
from pitsearch.search.space import SearchSpace, to_plain

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
    cfg_sampler: Any, space: SearchSpace, n_objectives: int, *, worker_index: int = 0
) -> optuna.samplers.BaseSampler:
    """Build `sweep.sampler`. Grid uses the same seed in every worker (it shuffles the grid with it, and
    trial k takes cell k); the others get `seed + worker_index`, so parallel workers do not draw the same
    random points."""
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
        if seed is not None:
            kwargs["seed"] = seed + worker_index
        _check_kwargs(cls, kwargs, "sweep.sampler")
    return _construct(cls, kwargs, "sweep.sampler")


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


