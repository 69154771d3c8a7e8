"""Model configs: named presets (conf/model/NAME.yaml, the single source of their numbers), resolution of a
preset / dict / DictConfig plus overrides into one full dict, and validation that names the offending field.

Validation runs before anything is built, so a bad sweep point fails in microseconds with one line such as
`model.heads: has 2 entries but model.depths has 3 (one per stage)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pitsearch.errors import ConfigError
from pitsearch.paths import MODEL_CONF_DIR

# Keys without which no architecture is defined; a preset or dict must give them.
REQUIRED_KEYS = ("depths", "heads", "head_dims", "patch_size", "stride", "pool")
# Keys that may be left out of a dict config (every preset file still spells them all out).
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "name": None,
    "mlp_ratio": 4.0,
    "drop_path": 0.0,
    "drop_rate": 0.0,
    "cls_pos_embed": False,
    "img_size": None,
    "in_chans": None,
    "num_classes": None,
    "pretrained": False,
    "timm_name": None,
}
# null means "filled from the data config"; without one (profiling, tests) the ImageNet shape is assumed.
DATA_SHAPE_DEFAULTS = {"img_size": 224, "in_chans": 3, "num_classes": 1000}
# Every key, in the order of the preset files.
MODEL_KEYS = ("name", "depths", "heads", "head_dims", "patch_size", "stride", "pool", "mlp_ratio", "drop_path",
              "drop_rate", "cls_pos_embed", "img_size", "in_chans", "num_classes", "pretrained", "timm_name")
# The keys PoolingViT takes; the rest (name, pretrained, timm_name) steer build_model.
ARCH_KEYS = ("depths", "heads", "head_dims", "patch_size", "stride", "pool", "mlp_ratio", "drop_path", "drop_rate",
             "cls_pos_embed", "img_size", "in_chans", "num_classes")
STAGE_LIST_KEYS = ("depths", "heads", "head_dims")
POSITIVE_INT_KEYS = ("patch_size", "stride", "img_size", "in_chans", "num_classes")


def list_presets() -> list[str]:
    """Names of the preset files in conf/model/ (files starting with `_` are not presets)."""
    return sorted(path.stem for path in MODEL_CONF_DIR.glob("*.yaml") if not path.stem.startswith("_"))


def load_preset(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf  # OmegaConf's YAML loader, so presets parse exactly as Hydra reads them

    path = MODEL_CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("model", f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _as_plain_dict(config: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, str):
        return load_preset(config)
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return dict(config)
    raise ConfigError("model", f"expected a preset name or a mapping, got {type(config).__name__}")


def _plain_value(value: Any) -> Any:
    """ListConfig / tuple -> list, so configs from Hydra, the CLI and Python compare and serialise alike."""
    from omegaconf import ListConfig, OmegaConf

    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value


def _complete(config: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Preset/dict + overrides -> dict with every key present and data-shape nulls filled; rejects unknown or
    missing keys (a typo such as `model.dept=3` would otherwise be silently ignored)."""
    merged = {**OPTIONAL_DEFAULTS, **_as_plain_dict(config), **dict(overrides or {})}
    for key in merged:
        if key not in MODEL_KEYS:
            raise ConfigError(f"model.{key}", f"unknown key; valid keys: {', '.join(MODEL_KEYS)}")
    for key in REQUIRED_KEYS:
        if merged.get(key) is None:
            raise ConfigError(f"model.{key}", "is required")
    for key, default in DATA_SHAPE_DEFAULTS.items():
        if merged[key] is None:
            merged[key] = default
    return {key: _plain_value(merged[key]) for key in MODEL_KEYS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_stage_lists(cfg: dict[str, Any]) -> None:
    for key in STAGE_LIST_KEYS:
        values = cfg[key]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"model.{key}", f"expected a non-empty list (one entry per stage), got {values!r}")
        if not all(_is_int(v) and v > 0 for v in values):
            raise ConfigError(f"model.{key}", f"every entry must be a positive integer, got {values}")
    num_stages = len(cfg["depths"])
    for key in ("heads", "head_dims"):
        if len(cfg[key]) != num_stages:
            raise ConfigError(f"model.{key}",
                              f"has {len(cfg[key])} entries but model.depths has {num_stages} (one per stage)")


def _check_scalars(cfg: dict[str, Any]) -> None:
    for key in POSITIVE_INT_KEYS:
        if not (_is_int(cfg[key]) and cfg[key] > 0):
            raise ConfigError(f"model.{key}", f"must be a positive integer, got {cfg[key]!r}")
    if not (_is_number(cfg["mlp_ratio"]) and cfg["mlp_ratio"] > 0):
        raise ConfigError("model.mlp_ratio", f"must be a number > 0, got {cfg['mlp_ratio']!r}")
    for key in ("drop_path", "drop_rate"):
        if not (_is_number(cfg[key]) and 0 <= cfg[key] < 1):
            raise ConfigError(f"model.{key}", f"must be a number in [0, 1), got {cfg[key]!r}")
    for key in ("cls_pos_embed", "pretrained"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"model.{key}", f"must be true or false, got {cfg[key]!r}")
    for key in ("name", "timm_name"):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"model.{key}", f"must be a string or null, got {cfg[key]!r}")
    if cfg["pretrained"] and not cfg["timm_name"]:
        raise ConfigError("model.pretrained", "true needs model.timm_name (the timm model whose weights to load)")


def _check_geometry(cfg: dict[str, Any]) -> None:
    from pitsearch.models.pit import stage_layout
    from pitsearch.models.pooling import POOL_TYPES, pool_names

    if not isinstance(cfg["pool"], str) or cfg["pool"] not in POOL_TYPES:
        raise ConfigError("model.pool", f"unknown pool type {cfg['pool']!r}; valid: {', '.join(pool_names())}")
    if cfg["patch_size"] > cfg["img_size"]:
        raise ConfigError("model.patch_size",
                          f"{cfg['patch_size']} is larger than the {cfg['img_size']} px image (model.img_size)")
    pool_class = POOL_TYPES[cfg["pool"]]
    channels = [h * d for h, d in zip(cfg["heads"], cfg["head_dims"])]
    for s in range(1, len(channels)):
        problem = pool_class.channel_problem(channels[s - 1], channels[s])
        if problem:
            raise ConfigError("model.pool", f"{cfg['pool']!r} cannot go from stage {s - 1} to stage {s}: {problem} "
                                            "(channels = model.heads x model.head_dims)")
    layout = stage_layout(cfg["img_size"], cfg["patch_size"], cfg["stride"], cfg["pool"], len(channels))
    grids = " -> ".join(f"{h}x{w}" for h, w in (stage["grid"] for stage in layout))
    for s in range(1, len(channels)):
        height, width = layout[s - 1]["grid"]
        if min(height, width) < pool_class.min_input_grid:
            raise ConfigError(
                "model.depths",
                f"{len(channels)} stages need {len(channels) - 1} '{cfg['pool']}' pooling steps, but the token grid "
                f"goes {grids} and a pooling step needs an input grid of at least {pool_class.min_input_grid}x"
                f"{pool_class.min_input_grid} (so every later stage keeps >= 2x2 tokens); use fewer stages, a larger "
                f"model.img_size or a smaller model.stride",
            )


def validate_model_config(cfg: Any) -> None:
    """Raise ConfigError (one line, naming the full field path such as `model.heads`) for any config that could
    not build a working model. Null img_size / in_chans / num_classes are checked as 224 / 3 / 1000.

    Grid rule: a grid-reducing pooling step (conv, max, avg: 3x3, stride 2, padding 1) needs an input grid of
    at least 3x3, so that every stage after it has at least 2x2 spatial tokens; `none` has no such limit.
    """
    _check_full(_complete(cfg))


def _check_full(cfg: dict[str, Any]) -> None:
    _check_stage_lists(cfg)
    _check_scalars(cfg)
    _check_geometry(cfg)


def resolve_model_config(preset_name_or_config: Any, **overrides: Any) -> dict[str, Any]:
    """Preset name, dict or DictConfig (+ keyword overrides, which win) -> the full validated config dict,
    with every key of MODEL_KEYS present and null img_size / in_chans / num_classes set to 224 / 3 / 1000."""
    cfg = _complete(preset_name_or_config, overrides)
    _check_full(cfg)
    return cfg
