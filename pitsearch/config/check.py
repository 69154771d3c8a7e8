"""Configs checked against their schema (pitsearch.config.schema): types and unknown keys by OmegaConf, ranges and
choices from the fields' metadata, each failure one `ConfigError` naming the field:

    train.epochs: must be an integer >= 1, got 'true'

`checked(group, node)` is the way in for code handed a config (a dict or DictConfig): it returns the group's full
plain dict, defaults filled in. `check_config(cfg)` checks every group of a composed config; `SchemaCheck` runs it
as a Hydra callback, after Hydra composed the config and before it makes the run's folder. `problem(error)` turns
an OmegaConf error raised while Hydra composes into the same line (pitsearch.cli uses it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

from pitsearch.config import schema as schemas
from pitsearch.errors import ConfigError


def schema_for(group: str, node: Any) -> type:
    """The group's dataclass; for `data`, the one of the data set `node` names."""
    if group != "data":
        return schemas.GROUP_SCHEMAS[group]
    name = node.get("name") if isinstance(node, Mapping) or hasattr(node, "get") else None
    if name not in schemas.DATA_SCHEMAS:
        raise ConfigError("data.name", f"unknown data set {name!r}; valid: {', '.join(sorted(schemas.DATA_SCHEMAS))}")
    return schemas.DATA_SCHEMAS[name]


def checked(group: str, node: Any) -> dict[str, Any]:
    """`node` (dict, DictConfig or None) over the group's schema -> the full plain dict, defaults filled in and
    required keys left unset as None. Raises ConfigError naming `<group>.<key>` for a wrong type, an unknown key
    or a value out of its range."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = plain(node) if node is not None else {}
    if not isinstance(node, Mapping):
        raise ConfigError(group, f"must be a mapping, got {_text(node)!r}")
    schema = schema_for(group, node)
    _check_shapes(schema, node, group)
    try:
        merged = OmegaConf.merge(_base(schema), node)
    except OmegaConfBaseException as error:
        raise ConfigError(*problem(error, prefix=group)) from None
    full = OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)
    for path in OmegaConf.missing_keys(merged):
        if "[" in path:   # inside a list (an objective's metric): left as "???" for its own check
            continue
        *parents, last = path.split(".")
        target = full
        for part in parents:
            target = target[part]
        target[last] = None
    _check_limits(schema, full, group)
    return full


def plain(node: Any) -> Any:
    """A DictConfig as a plain dict (resolved); a mapping as a dict; anything else as it is."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node


@functools.lru_cache(maxsize=None)
def _base(schema: type):
    from omegaconf import OmegaConf

    return OmegaConf.structured(schema)   # merge() copies it: the cached node is never changed


def check_config(cfg: Any) -> None:
    """Every group of a composed config against its schema, and no top-level key the schema lacks (Hydra's
    `+key=value` adds keys even to a typed node)."""
    names = schemas.field_names(schemas.PitsearchConfig)
    for key in cfg:
        if key != "hydra" and key not in names:
            raise ConfigError(str(key), f"unknown key; valid: {', '.join(names)}")
    for group in schemas.GROUP_SCHEMAS:
        node = cfg.get(group)
        if node is not None or group != "sweep":
            checked(group, node)


class SchemaCheck:
    """Hydra callback (conf/config.yaml, `hydra.callbacks`): check_config before the run's folder exists.

    Hydra turns a callback's exception into a warning and goes on, so a failure is printed here (pitsearch.cli's
    one line) and ends the process with SystemExit, which Hydra lets through."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from pitsearch.cli import guarded

        status = guarded(check_config, config)
        if status:
            raise SystemExit(status)

    def __getattr__(self, name: str):   # Hydra calls every hook (on_job_start, on_run_end, ...): nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


# --- messages ---------------------------------------------------------------------------------------------------

def problem(error: Any, prefix: str = "") -> tuple[str, str]:
    """(field, problem) for an OmegaConf error on a schema node; `prefix` when the node was checked on its own."""
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    key = error.full_key or ""
    field = ".".join(part for part in (prefix, str(key)) if part) or "config"
    schema = error.object_type if dataclasses.is_dataclass(error.object_type) else None
    message = _first_line(error.msg or error)
    if isinstance(error, ConfigKeyError) and " not in " in message and schema is not None:
        return field, f"unknown key; valid: {', '.join(schemas.field_names(schema))}"
    if isinstance(error, MissingMandatoryValue):
        return field, "is required"
    if isinstance(error, ValidationError) or "not a subclass" in message or "Cannot assign" in message:
        hint = _hint(schema, error.key)
        expected = _describe(hint, _limits(schema, error.key)) if hint is not None else _from_message(message)
        return field, f"must be {expected}, got {_text(error.value)!r}"
    return field, message


def _hint(schema: type | None, key: Any) -> Any:
    if schema is None or not isinstance(key, str):
        return None
    return _hints(schema).get(key)


@functools.lru_cache(maxsize=None)
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema, vars(schemas))


def _limits(schema: type | None, key: Any) -> Mapping[str, Any]:
    if schema is None:
        return {}
    return next((f.metadata for f in dataclasses.fields(schema) if f.name == key), {})


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _describe(hint: Any, limits: Mapping[str, Any]) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        inner = next(arg for arg in args if arg is not type(None))
        return f"{_describe(inner, limits)} or null"
    if origin in (list, typing.List):
        return f"a list of {_PLURAL.get(args[0], 'mappings')}" if args else "a list"
    if origin in (dict, typing.Dict) or dataclasses.is_dataclass(hint):
        return "a mapping"
    if "choices" in limits:
        return "one of " + ", ".join(map(str, limits["choices"]))
    return " ".join([_KINDS.get(hint, "a value"), *_range_text(limits)]).strip()


def _range_text(limits: Mapping[str, Any]) -> list[str]:
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = (limits["le"], "]") if "le" in limits else (limits["lt"], ")") if "lt" in limits else None
    if low and high:
        return [f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"]
    if low:
        return [f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"]
    if high:
        return [f"{'<=' if high[1] == ']' else '<'} {high[0]:g}"]
    return []


def _from_message(message: str) -> str:
    for word, kind in (("Integer", "an integer"), ("Float", "a number"), ("bool", "true or false"),
                       ("String", "a string")):
        if word in message:
            return kind
    return "another type"


def _text(value: Any) -> str:
    """A value as a YAML line spells it: true, null, [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _first_line(value: Any) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return lines[0] if lines else type(value).__name__


# --- what no type can say ---------------------------------------------------------------------------------------

def _check_shapes(schema: type, node: Mapping[str, Any], prefix: str) -> None:
    """What OmegaConf's merge lets through or reports without the key: true / false only (it turns 1, "yes" or
    "on" into true), and a mapping for a nested section (its error for `budget: abc` names no field)."""
    for f in dataclasses.fields(schema):
        hint, value = _hints(schema)[f.name], node.get(f.name)
        if hint in (bool, typing.Optional[bool]) and value is not None and not isinstance(value, bool):
            raise ConfigError(f"{prefix}.{f.name}", f"must be true or false, got {_text(value)!r}")
        if dataclasses.is_dataclass(hint) and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}.{f.name}", f"must be a mapping, got {_text(value)!r}")
            _check_shapes(hint, value, f"{prefix}.{f.name}")


def _check_limits(schema: type, plain: Mapping[str, Any], prefix: str) -> None:
    for f in dataclasses.fields(schema):
        value, hint, limits = plain.get(f.name), _hints(schema)[f.name], f.metadata
        field = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            _check_limits(hint, value, field)
            continue
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item) and isinstance(value, list):
            for i, entry in enumerate(value):
                _check_limits(item, entry, f"{field}[{i}]")
            continue
        if value is None or not limits:
            continue
        # The value has its type here: shown as Python shows it (got 0, got 'x'), like every range check.
        if "choices" in limits and value not in limits["choices"]:
            raise ConfigError(field, f"must be {_describe(hint, limits)}, got {value!r}")
        if "check" in limits and limits["check"](value):   # a rule no type or range says: it names the problem
            raise ConfigError(field, limits["check"](value))
        if isinstance(value, (int, float)) and not _within(value, limits):
            raise ConfigError(field, f"must be {_describe(hint, limits)}, got {value!r}")


def _within(value: float, limits: Mapping[str, Any]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (value >= limits.get("ge", -math.inf) and value > limits.get("gt", -math.inf)
            and value <= limits.get("le", math.inf) and value < limits.get("lt", math.inf))
