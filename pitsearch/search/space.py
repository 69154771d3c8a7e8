"""The search-space grammar of a sweep file (`sweep.space`), parsed once and validated up front.

Each key is a full config path; its spec is either categorical (`choices`) or a range (`low`/`high`, with
`step`, `log`, `type`). A `when` condition (`PATH == v`, `PATH != v`, `PATH in [a, b]`) on an earlier
categorical parameter makes a parameter conditional. Seeds are an axis: `train.seed` over `sweep.seeds`.

Optuna categoricals (and GridSampler's stored grid) need hashable primitives, so list- and dict-valued
choices are stored encoded as JSON strings (`"[1, 2, 1]"`, readable in the dashboard) and decoded back here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from pitsearch.errors import ConfigError
from pitsearch.search.overrides import (PRIMITIVES, check_hydra_round_trip, encode_value, hydra_value, is_number,
                                        is_plain_data, to_plain, type_name)

SEED_PATH = "train.seed"
SPEC_KEYS = ("choices", "low", "high", "step", "log", "type", "when")
_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*([./][A-Za-z_][A-Za-z0-9_]*)*$")
_WHEN_RE = re.compile(r"^\s*(?P<path>\S+?)\s*(?P<op>==|!=|\s+in\s+)\s*(?P<value>.+?)\s*$")


@dataclass(frozen=True)
class Condition:
    """`path op value`: holds when the earlier parameter `path` was suggested and its value matches."""

    path: str
    op: str  # "==", "!=" or "in"
    value: Any  # a list when op is "in"
    text: str

    def holds(self, values: Mapping[str, Any]) -> bool:
        if self.path not in values:
            return False
        actual = values[self.path]
        if self.op == "in":
            return actual in self.value
        return (actual == self.value) == (self.op == "==")


@dataclass(frozen=True)
class Param:
    """One parameter: categorical when `choices` is set, else an int or float range."""

    path: str
    choices: tuple[Any, ...] | None = None  # decoded values, in declaration order
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    kind: str = "categorical"  # "categorical" | "int" | "float"
    when: Condition | None = None

    @property
    def encoded_choices(self) -> list[Any]:
        return [encode_value(c) for c in self.choices or ()]

    @property
    def probe_values(self) -> list[Any]:
        """Values that exercise this parameter: every choice, or both ends of the range."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def decode(self, stored: Any) -> Any:
        """Stored value -> choice; a value that is no encoding (given already decoded) passes through."""
        if self.kind == "categorical" and isinstance(stored, str):
            for choice in self.choices or ():
                if not isinstance(choice, PRIMITIVES) and encode_value(choice) == stored:
                    return choice
        return stored


class SearchSpace:
    """Parsed `sweep.space` (+ the seed axis); names of Optuna params are the config paths."""

    def __init__(self, params: list[Param]):
        self.params = params
        self._by_path = {p.path: p for p in params}

    @property
    def names(self) -> list[str]:
        """Optuna param names = config paths, in declaration order (train.seed last)."""
        return [p.path for p in self.params]

    @property
    def is_categorical(self) -> bool:
        return all(p.kind == "categorical" for p in self.params)

    @property
    def is_conditional(self) -> bool:
        return any(p.when is not None for p in self.params)

    def suggest(self, trial: Any, seed_range: bool = False) -> dict[str, Any]:
        """Suggest every parameter whose condition holds; returns path -> decoded value. `seed_range`: see
        `distributions`."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.when is not None and not p.when.holds(values):
                continue
            if seed_range and p.path == SEED_PATH:
                values[p.path] = trial.suggest_int(p.path, min(p.choices), max(p.choices))
            elif p.kind == "categorical":
                values[p.path] = p.decode(trial.suggest_categorical(p.path, p.encoded_choices))
            elif p.kind == "int":
                values[p.path] = trial.suggest_int(p.path, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                values[p.path] = trial.suggest_float(p.path, p.low, p.high, step=p.step, log=p.log)
        return values

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Stored Optuna params (trial.params) -> real values; unknown names pass through."""
        return {k: self._by_path[k].decode(v) if k in self._by_path else v for k, v in params.items()}

    def encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Real values -> Optuna params, for `study.enqueue_trial` or `optuna.trial.FixedTrial`."""
        out = {}
        for k, v in values.items():
            p = self._by_path.get(k)
            out[k] = encode_value(to_plain(v)) if p is not None and p.kind == "categorical" else v
        return out

    def grid(self) -> dict[str, list[Any]]:
        """The GridSampler search space (encoded values, declaration order)."""
        if not self.is_categorical or self.is_conditional:
            raise ConfigError(
                "sweep.sampler", "grid needs categorical, unconditional parameters; use bruteforce or tpe"
            )
        return {p.path: p.encoded_choices for p in self.params}

    def iter_cells(self) -> Iterator[dict[str, Any]]:
        """Every configuration of an all-categorical space (conditions respected), as decoded values."""
        if not self.is_categorical:
            raise ConfigError("sweep.space", "only categorical spaces have a finite set of cells")

        def walk(i: int, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(self.params):
                yield dict(values)
                return
            p = self.params[i]
            if p.when is not None and not p.when.holds(values):
                yield from walk(i + 1, values)
                return
            for choice in p.choices or ():
                values[p.path] = choice
                yield from walk(i + 1, values)
                del values[p.path]

        yield from walk(0, {})

    @property
    def grid_size(self) -> int | None:
        """Number of distinct configurations; None when a range parameter makes it unbounded."""
        if not self.is_categorical:
            return None
        if not self.is_conditional:
            return math.prod(len(p.choices or ()) for p in self.params)
        return sum(1 for _ in self.iter_cells())

    def distributions(self, seed_range: bool = False) -> dict[str, Any]:
        """The Optuna distribution `suggest` stores for each parameter. With `seed_range` (grid sweeps) the seed
        axis is an IntDistribution spanning the seeds rather than a categorical: Optuna refuses a categorical
        whose choices change, and a grid grows by adding seeds (the grid's cells, not the distribution, say
        which seeds run; samplers that draw, like TPE, keep the categorical so they draw listed seeds only)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        for p in self.params:
            if seed_range and p.path == SEED_PATH:
                out[p.path] = IntDistribution(min(p.choices), max(p.choices))
            elif p.kind == "categorical":
                out[p.path] = CategoricalDistribution(p.encoded_choices)
            elif p.kind == "int":
                out[p.path] = IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
            else:
                out[p.path] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        return out

    def cell_key(self, values: Mapping[str, Any]) -> frozenset:
        """The one identity of a configuration (a grid cell): its swept values, encoded as Optuna stores them.
        Takes decoded values or a trial's stored params alike (encoding is idempotent); names outside the space
        are ignored. Values are compared as JSON, so 1, 1.0 and true (equal in Python) stay distinct cells."""
        return frozenset((k, json.dumps(v, sort_keys=True, default=str))
                         for k, v in self.encode({k: v for k, v in values.items() if k in self._by_path}).items())

    def to_overrides(self, values: Mapping[str, Any]) -> list[str]:
        """Hydra override strings (`model.pool=conv`, `model.depths=[1,2,1]`), space order first."""
        order = [p for p in self.names if p in values] + [k for k in values if k not in self._by_path]
        return [f"{k}={hydra_value(to_plain(values[k]))}" for k in order]

    def variant_key(self, values: Mapping[str, Any]) -> str:
        """A stable, readable key of the non-seed parameters: groups the seeds of one variant."""
        rest = {k: v for k, v in values.items() if k != SEED_PATH}
        return " ".join(self.to_overrides(rest)) or "default"

    def example_values(self) -> list[dict[str, Any]]:
        """A few configurations that together use every choice and both ends of every range (conditions
        respected): composing each one checks the whole space against the config before any trial."""
        probes = {p.path: p.probe_values for p in self.params}
        uncovered = {(name, i) for name, values in probes.items() for i in range(len(values))}
        rows = []
        for i in range(max((len(v) for v in probes.values()), default=1)):  # diagonal rows first
            row: dict[str, Any] = {}
            for p in self.params:
                if p.when is None or p.when.holds(row):
                    row[p.path] = probes[p.path][i % len(probes[p.path])]
                    uncovered.discard((p.path, i % len(probes[p.path])))
            rows.append(row)
        for name, i in sorted(uncovered):  # values behind a condition the diagonal missed
            row = self._row_with(name, probes[name][i], probes)
            if row is not None and row not in rows:
                rows.append(row)
        return rows

    def example_overrides(self) -> list[list[str]]:
        return [self.to_overrides(row) for row in self.example_values()]

    def _row_with(self, target: str, value: Any, probes: Mapping[str, list]) -> dict[str, Any] | None:
        referenced = {p.when.path for p in self.params if p.when is not None}

        def walk(i: int, row: dict[str, Any]) -> dict[str, Any] | None:
            if i == len(self.params):
                return dict(row) if target in row else None
            p = self.params[i]
            if p.when is not None and not p.when.holds(row):
                return walk(i + 1, row)
            options = [value] if p.path == target else probes[p.path] if p.path in referenced else probes[p.path][:1]
            for option in options:
                found = walk(i + 1, {**row, p.path: option})
                if found is not None:
                    return found
            return None

        return walk(0, {})

    def describe(self) -> dict[str, Any]:
        """A plain-data description (for logging the space as a run param/artifact)."""
        out: dict[str, Any] = {}
        for p in self.params:
            d: dict[str, Any] = {"choices": list(p.choices)} if p.kind == "categorical" else {
                "low": p.low, "high": p.high, "step": p.step, "log": p.log, "type": p.kind}
            if p.when is not None:
                d["when"] = p.when.text
            out[p.path] = d
        return out


# ---------------------------------------------------------------------------------------------- parsing


def parse_space(
    space_node: Any,
    seeds: Any = None,
    known_paths: Collection[str] | Callable[[str], bool] | None = None,
) -> SearchSpace:
    """Parse and validate `sweep.space` (and `sweep.seeds`) into a SearchSpace; raises ConfigError."""
    node = to_plain(space_node) if space_node is not None else {}
    if not isinstance(node, dict):
        raise ConfigError("sweep.space", f"must be a mapping of config path -> spec, got {type_name(node)}")
    path_exists = _path_checker(known_paths)
    params: list[Param] = []
    for path, spec in node.items():
        field = f"sweep.space.{path}"
        if not isinstance(path, str) or not _PATH_RE.match(path):
            raise ConfigError(field, "not a config path (expected dotted names like model.pool)")
        if seeds is not None and path == SEED_PATH:
            raise ConfigError(field, "given both here and as sweep.seeds; keep one")
        if path_exists is not None and not path_exists(path):
            raise ConfigError(field, "unknown parameter path")
        params.append(_parse_param(path, spec, {p.path: p for p in params}))
    if seeds is not None:
        params.append(Param(SEED_PATH, choices=tuple(_parse_seeds(seeds))))
        if path_exists is not None and not path_exists(SEED_PATH):
            raise ConfigError("sweep.seeds", f"{SEED_PATH} is not in the composed config")
    return SearchSpace(params)


def _parse_param(path: str, spec: Any, earlier: Mapping[str, Param]) -> Param:
    field = f"sweep.space.{path}"
    if not isinstance(spec, dict):
        raise ConfigError(field, f"expected a mapping like {{choices: [...]}} or {{low: .., high: ..}}, "
                                 f"got {type_name(spec)}")
    for key in spec:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{field}.{key}", f"unknown key; valid: {', '.join(SPEC_KEYS)}")
    when = _parse_when(spec["when"], field, earlier) if spec.get("when") is not None else None
    if "choices" in spec:
        extra = [k for k in ("low", "high", "step", "log", "type") if k in spec]
        if extra:
            raise ConfigError(f"{field}.{extra[0]}", "not allowed with choices")
        return Param(path, choices=_parse_choices(spec["choices"], field), when=when)
    return _parse_range(path, spec, field, when)


def _parse_choices(choices: Any, field: str) -> tuple[Any, ...]:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(field, "choices must be a non-empty list")
    seen: dict[str, Any] = {}
    for choice in choices:
        if not is_plain_data(choice):
            raise ConfigError(field, f"choice {choice!r} must be a number, string, bool, null, list or mapping")
        ident = json.dumps(choice, sort_keys=True)
        if ident in seen:
            raise ConfigError(field, f"choices contain {choice!r} twice")
        seen[ident] = choice
    encoded = [encode_value(c) for c in choices]
    strings = [e for e in encoded if isinstance(e, str)]
    if len(set(strings)) != len(strings):
        raise ConfigError(field, "a string choice equals the encoding of a list/mapping choice; rename it")
    for choice in choices:
        check_hydra_round_trip(field, choice)
    return tuple(choices)


def _parse_range(path: str, spec: dict, field: str, when: Condition | None) -> Param:
    if "low" not in spec or "high" not in spec:
        raise ConfigError(field, "needs either choices or both low and high")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and not is_number(value):
            raise ConfigError(f"{field}.{key}", f"must be a number, got {value!r} ({type_name(value)})")
    if not isinstance(log, bool):
        raise ConfigError(f"{field}.log", f"must be true or false, got {log!r}")
    kind = spec.get("type")
    if kind is None:
        kind = "int" if all(isinstance(v, int) for v in (low, high, step) if v is not None) else "float"
    elif kind not in ("int", "float"):
        raise ConfigError(f"{field}.type", f"must be int or float, got {kind!r}")
    if kind == "int":
        for key, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and not (isinstance(value, int) or float(value).is_integer()):
                raise ConfigError(f"{field}.{key}", f"must be an integer for type int, got {value!r}")
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    if not low < high:
        raise ConfigError(field, "low must be < high")
    if log and low <= 0:
        raise ConfigError(field, "log needs low > 0")
    if step is not None:
        if log:
            raise ConfigError(field, "step cannot be combined with log")
        if step <= 0:
            raise ConfigError(f"{field}.step", "must be > 0")
        n_steps = (high - low) / step
        if abs(n_steps - round(n_steps)) > 1e-9 * max(1.0, abs(n_steps)):
            raise ConfigError(f"{field}.step", f"high - low ({high - low}) must be a multiple of step ({step})")
    return Param(path, low=low, high=high, step=step, log=log, kind=kind, when=when)


def _parse_when(text: Any, field: str, earlier: Mapping[str, Param]) -> Condition:
    wfield = f"{field}.when"
    m = _WHEN_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(wfield, f"cannot parse {text!r}; use 'PATH == value', 'PATH != value' or 'PATH in [a, b]'")
    path, op, raw = m["path"], m["op"].strip(), m["value"]
    if path not in earlier:
        raise ConfigError(wfield, f"{path} is not a parameter defined earlier in sweep.space")
    ref = earlier[path]
    if ref.kind != "categorical":
        raise ConfigError(wfield, f"{path} is a range; conditions may only reference categorical parameters")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(wfield, f"cannot parse the value {raw!r}") from None
    candidates = value if op == "in" else [value]
    if op == "in" and not isinstance(value, list):
        raise ConfigError(wfield, f"'in' needs a list like [a, b], got {raw!r}")
    for v in candidates:
        if v not in ref.choices:
            raise ConfigError(wfield, f"{v!r} is not one of the choices of {path}: {list(ref.choices)}")
    return Condition(path, op, value, text.strip())


def _parse_seeds(seeds: Any) -> list[int]:
    seeds = to_plain(seeds)
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError("sweep.seeds", "must be a non-empty list of integers")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError("sweep.seeds", f"{s!r} is not an integer")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("sweep.seeds", "contains duplicates")
    return seeds


def _path_checker(known: Collection[str] | Callable[[str], bool] | None) -> Callable[[str], bool] | None:
    if known is None or callable(known):
        return known
    return set(known).__contains__


__all__ = ["SEED_PATH", "Condition", "Param", "SearchSpace", "parse_space"]
