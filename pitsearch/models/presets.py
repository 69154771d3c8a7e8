"""Model configs: named presets (conf/model/NAME.yaml, the single source of their numbers; every other key's
default is ModelConfig's in pitsearch.config.schema), resolution of a preset / dict / DictConfig plus overrides
into one full dict, and validation that names the offending field.

Validation runs before anything is built, so a bad sweep point fails in microseconds with one line such as
`model.heads: has 2 entries but model.depths has 3 (one per stage)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pitsearch.config.schema import IMAGENET_SHAPE, ModelConfig, field_names, required_keys
from pitsearch.errors import ConfigError
from pitsearch.paths import MODEL_CONF_DIR

# Every key, type and default is ModelConfig's (pitsearch.config.schema); a preset sets what differs.
MODEL_KEYS = tuple(field_names(ModelConfig))
# Keys without which no architecture is defined; a preset or dict must give them.
REQUIRED_KEYS = tuple(required_keys(ModelConfig))
# null means "filled from the data config"; without one (profiling, tests) the ImageNet shape is assumed.
DATA_SHAPE_DEFAULTS = IMAGENET_SHAPE
# The keys PoolingViT takes; the rest (name, pretrained, timm_name) steer build_model.
ARCH_KEYS = tuple(key for key in MODEL_KEYS if key not in ("name", "pretrained", "timm_name"))
STAGE_LIST_KEYS = ("depths", "heads", "head_dims")


def list_presets() -> list[str]:
    """Names of the preset files in conf/model/ (files starting with `_` are not presets)."""
    return sorted(path.stem for path in MODEL_CONF_DIR.glob("*.yaml") if not path.stem.startswith("_"))


def load_preset(name: str) -> dict[str, Any]:
    """conf/model/NAME.yaml as it is written (the keys it sets; `_complete` adds the schema's defaults)."""
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


def _complete(config: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Preset/dict + overrides -> dict with every key present and data-shape nulls filled. Types, unknown keys
    (a typo such as `model.dept=3` would otherwise be silently ignored) and ranges: ModelConfig's."""
    from pitsearch.config import checked

    merged = checked("model", {**_as_plain_dict(config), **dict(overrides or {})})
    for key in REQUIRED_KEYS:
        if merged[key] is None:
            raise ConfigError(f"model.{key}", "is required")
    for key, default in DATA_SHAPE_DEFAULTS.items():
        if merged[key] is None:
            merged[key] = default
    return merged


def _check_stage_lists(cfg: dict[str, Any]) -> None:
    for key in STAGE_LIST_KEYS:
        values = cfg[key]
        if not values:
            raise ConfigError(f"model.{key}", f"expected a non-empty list (one entry per stage), got {values!r}")
        if not all(v > 0 for v in values):
            raise ConfigError(f"model.{key}", f"every entry must be a positive integer, got {values}")
    num_stages = len(cfg["depths"])
    for key in ("heads", "head_dims"):
        if len(cfg[key]) != num_stages:
            raise ConfigError(f"model.{key}",
                              f"has {len(cfg[key])} entries but model.depths has {num_stages} (one per stage)")


def _check_scalars(cfg: dict[str, Any]) -> None:
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
