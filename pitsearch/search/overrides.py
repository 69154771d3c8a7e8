"""Config values as Hydra and Optuna see them: plain Python data out of OmegaConf, the right-hand side of a
command-line override (`hydra_value`), and the check that a value comes back unchanged through Hydra's parser.
Optuna categoricals need hashable primitives, so lists and dicts are stored as JSON strings (`encode_value`)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pitsearch.errors import ConfigError

_PLAIN_STR_RE = re.compile(r"^[A-Za-z_/][A-Za-z0-9_\-/.]*$")
_HYDRA_KEYWORDS = {"null", "true", "false", "inf", "nan"}
PRIMITIVES = (str, int, float, bool, type(None))


def to_plain(value: Any) -> Any:
    """OmegaConf containers (and tuples) -> plain Python lists/dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return list(value)
    return value


def encode_value(value: Any) -> Any:
    return value if isinstance(value, PRIMITIVES) else json.dumps(value)


def type_name(value: Any) -> str:
    return type(value).__name__


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_plain_data(value: Any) -> bool:
    if isinstance(value, PRIMITIVES):
        return True
    if isinstance(value, list):
        return all(is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_data(v) for k, v in value.items())
    return False


def hydra_value(value: Any) -> str:
    """Format a plain value as the right-hand side of a Hydra command-line override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 'inf', 'nan', '1e-05', '0.001' all parse back as floats
    if isinstance(value, str):
        if _PLAIN_STR_RE.match(value) and value.lower() not in _HYDRA_KEYWORDS:
            return value
        # Quoted: a backslash needs escaping only before a quote or at the end of the string.
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{hydra_value(k)}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot format {value!r} ({type_name(value)}) as a Hydra override value")


_OVERRIDES_PARSER = None


def check_hydra_round_trip(field: str, value: Any) -> None:
    """Fail up front if a choice would not come back unchanged (type included) through Hydra's parser."""
    global _OVERRIDES_PARSER
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    _OVERRIDES_PARSER = _OVERRIDES_PARSER or OverridesParser.create()
    text = f"x={hydra_value(value)}"
    try:
        parsed = _OVERRIDES_PARSER.parse_overrides([text])[0].value()
    except HydraException:
        parsed = check_hydra_round_trip  # anything unequal
    if json.dumps(parsed, default=repr) != json.dumps(value):  # json tells 1 from 1.0, true and "1"
        raise ConfigError(field, f"choice {value!r} does not survive as a Hydra override ({text})")
