"""The `sweep:` node of a sweep file, parsed and checked before any study or run exists.

Its keys, types, defaults and ranges are SweepConfig's (pitsearch.config.schema); checked here is what no type
says: the study name as a folder, the search space, samplers and pruners with their kwargs, adaptive seeds,
the baseline and compute matching.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pitsearch.errors import ConfigError

STATIC_METRICS = ("macs", "params")  # objectives known before training


@dataclass
class SweepSpec:
    study_name: str
    objectives: list[tuple[str, str]]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    storage: Any
    n_workers: int
    space: Any                      # pitsearch.search.space.SearchSpace
    output_dir: Path
    budget: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    match: Any = None               # pitsearch.search.match.SweepMatch, or None
    max_failures: int = 10
    report: bool = True
    gpus: list[int] | None = None
    trials_per_gpu: int = 1
    pack: Any = "off"               # "off", "auto" or a positive int (pitsearch.search.pack)
    retry_timeout_s: float = 60.0
    heartbeat_interval_s: int = 60
    adaptive: Any = None            # pitsearch.search.rounds.AdaptiveSeeds: `sweep.seeds` in its dict form
    raw: dict[str, Any] = field(default_factory=dict)
    optuna_sampler: Any = None      # built from `sampler` by parse_sweep (pitsearch.search.study.make_sampler)
    optuna_pruner: Any = None

    @property
    def directions(self) -> list[str]:
        return [direction for _, direction in self.objectives]

    @property
    def prunable(self) -> bool:
        return len(self.objectives) == 1 and self.objectives[0][0] not in STATIC_METRICS


def parse_sweep(node: Mapping[str, Any], known_paths=None, base_dir: str | Path | None = None) -> SweepSpec:
    """Validate the whole `sweep:` node; every error names its key (e.g. `sweep.sampler.name`)."""
    from pitsearch.search.match import parse_match
    from pitsearch.config import checked, plain
    from pitsearch.search.locations import default_sweep_dir
    from pitsearch.search.space import parse_space
    from pitsearch.search.study import make_pruner, make_sampler, parse_objectives

    if not isinstance(node, Mapping):
        raise ConfigError("sweep", "must be a mapping (did the sweep file forget `sweep:`?)")
    given = plain(node)
    node = checked("sweep", given)   # types, unknown keys, ranges; every default filled in
    study_name = node.get("study_name")
    if not isinstance(study_name, str) or not study_name.strip() or study_name == "???":
        raise ConfigError("sweep.study_name", "must be set to a non-empty string")
    # It names a folder, pitsearch-sweeps/<study_name>: "." or ".." would write into (or above) the working
    # folder, a leading dot hides it, separators nest it, whitespace and control characters garble it.
    if (study_name.startswith(".") or any(ch in study_name for ch in "/\\")
            or any(ch.isspace() or not ch.isprintable() for ch in study_name)):
        raise ConfigError("sweep.study_name", f"{study_name!r}: must be a plain folder name (no leading dot, "
                                              "no slashes, spaces or control characters)")
    objectives = parse_objectives(node.get("objectives"))
    seeds = node.get("seeds")
    adaptive = _adaptive_seeds(seeds) if isinstance(seeds, Mapping) else None
    if adaptive is not None:
        seeds = adaptive.seeds   # the seed axis holds every seed a round may open; the rounds say which run
    if seeds is not None and (not isinstance(seeds, (list, tuple)) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError("sweep.seeds", f"must be a non-empty list of integers, got {seeds!r}")
    space = parse_space(node["space"] or {}, seeds=list(seeds) if seeds else None, known_paths=known_paths)
    sampler_cfg = _named(node["sampler"], "sampler")
    pruner_cfg = _named(node["pruner"], "pruner")
    # Built once per process, here: a bad kwarg is one line before anything exists, and the study uses these.
    optuna_sampler = make_sampler(sampler_cfg, space, len(objectives), study_name=study_name)
    optuna_pruner = make_pruner(pruner_cfg, len(objectives))

    n_trials = node["n_trials"]
    if adaptive is not None and (sampler_cfg["name"] != "grid" or n_trials is not None):
        raise ConfigError("sweep.seeds", "the adaptive form {min, max, ...} needs `sampler: {name: grid}` and no "
                                         "sweep.n_trials (the rounds decide which cells run)")
    if n_trials is None:
        if sampler_cfg["name"] not in ("grid", "bruteforce"):
            raise ConfigError("sweep.n_trials", f"is required with the {sampler_cfg['name']} sampler")
        n_trials = space.grid_size
    gpus = node["gpus"]
    if gpus is not None and (not gpus or not all(g >= 0 for g in gpus)):
        raise ConfigError("sweep.gpus", f"must be null or a non-empty list of GPU indices, got {gpus!r}")
    # Budgets as given (2.0e+7 or 20000000), so the parent run's params read as the sweep file wrote them.
    budget = {**node["budget"], **(given.get("budget") or {})}
    baseline = dict(node["baseline"])
    for path in baseline:
        if path not in space.names:
            raise ConfigError(f"sweep.baseline.{path}", f"is not a swept parameter; swept: {', '.join(space.names)}")
    if adaptive is not None:
        _check_adaptive_baseline(space, baseline)
    match = parse_match(node["match"], space.names, known_paths)
    max_failures = node["max_failures"] or max(10, n_trials)
    base = Path(base_dir or os.getcwd()).resolve()
    output_dir = Path(node["output_dir"]) if node["output_dir"] else default_sweep_dir(study_name, base)
    output_dir = output_dir if output_dir.is_absolute() else (base / output_dir).resolve()
    return SweepSpec(study_name=study_name, objectives=objectives, sampler=sampler_cfg, pruner=pruner_cfg,
                     n_trials=n_trials, storage=node["storage"], n_workers=node["n_workers"], space=space,
                     output_dir=output_dir, budget=budget, baseline=baseline, max_failures=max_failures,
                     report=node["report"], match=match,
                     raw={**node, **given, **({"match": match.as_node()} if match is not None else {})},
                     gpus=list(gpus) if gpus is not None else None, trials_per_gpu=node["trials_per_gpu"],
                     retry_timeout_s=float(node["retry_timeout_s"]),
                     heartbeat_interval_s=node["heartbeat_interval_s"],
                     adaptive=adaptive, pack=_pack(node["pack"]), optuna_sampler=optuna_sampler,
                     optuna_pruner=optuna_pruner)


def _pack(value: Any) -> Any:
    """`sweep.pack` (checked by its schema, pitsearch.config.schema.pack_problem) as the packer reads it."""
    return "off" if value is None or value is False or value == 1 else value


ADAPTIVE_KEYS = ("min", "max", "min_effect", "alpha", "start")


def _adaptive_seeds(node: Mapping[str, Any]):
    """`sweep.seeds: {min, max, min_effect, alpha, start}` checked key by key (pitsearch.search.rounds)."""
    import math

    from pitsearch.search.rounds import AdaptiveSeeds

    unknown = sorted(set(node) - set(ADAPTIVE_KEYS))
    if unknown:
        raise ConfigError(f"sweep.seeds.{unknown[0]}", f"unknown key; valid: {', '.join(ADAPTIVE_KEYS)}")
    for key in ("min", "max"):
        if key not in node:
            raise ConfigError(f"sweep.seeds.{key}", "is required in the adaptive form {min, max, min_effect}")

    def integer(key: str, default: int) -> int:
        value = node.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"sweep.seeds.{key}", f"must be an integer, got {value!r}")
        return value

    def number(key: str, default: float) -> float:
        value = node.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"sweep.seeds.{key}", f"must be a number, got {value!r}")
        return float(value)

    low, high, start = integer("min", 0), integer("max", 0), integer("start", 0)
    min_effect, alpha = number("min_effect", 0.0), number("alpha", 0.05)
    if low < 2:   # an interval needs 2 paired deltas (pitsearch.sequential)
        raise ConfigError("sweep.seeds.min", f"must be >= 2 (an interval needs two seeds), got {low}")
    if high < low:
        raise ConfigError("sweep.seeds.max", f"must be >= sweep.seeds.min ({low}), got {high}")
    if min_effect < 0:
        raise ConfigError("sweep.seeds.min_effect", f"must be >= 0, got {min_effect:g}")
    if not 0 < alpha < 1:
        raise ConfigError("sweep.seeds.alpha", f"must be between 0 and 1 (exclusive), got {alpha:g}")
    return AdaptiveSeeds(min=low, max=high, min_effect=min_effect, alpha=alpha, start=start)


def _check_adaptive_baseline(space, baseline: dict[str, Any]) -> None:
    """Rounds compare each variant with its baseline counterpart: without one, nothing could be decided."""
    from pitsearch.search.rounds import variants_and_pairs

    if not baseline:
        raise ConfigError("sweep.baseline", "is required with adaptive seeds (the variant every other one is "
                                            "compared with), e.g. {model.pool: none}")
    if not variants_and_pairs(space, baseline)[1]:
        raise ConfigError("sweep.baseline", f"{baseline!r} matches no variant of the space that other variants "
                                            "could be compared with")


def _named(node: Any, key: str) -> dict[str, Any]:
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, Mapping) or not isinstance(node.get("name"), str):
        raise ConfigError(f"sweep.{key}", f"must be a name or a mapping with `name`, got {node!r}")
    return dict(node)
