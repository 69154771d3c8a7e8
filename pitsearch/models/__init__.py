"""The model family: one hierarchical ViT that is PiT with `conv` pooling and ViT with one stage.

`build_model(name_or_config, **overrides)` is the one way in: it resolves a preset (conf/model/NAME.yaml), a dict
or a DictConfig, validates it (ConfigError naming the field), builds the model and, when `pretrained: true`,
loads timm's weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pitsearch.models.pit import PoolingViT
from pitsearch.models.pooling import POOL_TYPES, TokenPool, pool_names, register_pool
from pitsearch.models.presets import (
    ARCH_KEYS,
    MODEL_KEYS,
    list_presets,
    load_preset,
    resolve_model_config,
    validate_model_config,
)

__all__ = [
    "MODEL_KEYS",
    "POOL_TYPES",
    "PoolingViT",
    "TokenPool",
    "build_model",
    "list_presets",
    "load_preset",
    "pool_names",
    "register_pool",
    "resolve_model_config",
    "validate_model_config",
]


def build_model(preset_name_or_config: Any, **overrides: Any) -> nn.Module:
    """Build a PoolingViT from a preset name, dict or DictConfig; keyword overrides win over the config.

    The resolved config is kept on the model as `model.model_config` (a plain dict) for logging.
    """
    cfg = resolve_model_config(preset_name_or_config, **overrides)
    model = PoolingViT(**{key: cfg[key] for key in ARCH_KEYS})
    model.model_config = cfg
    if cfg["pretrained"]:
        from pitsearch.models.timm_import import load_pretrained  # timm's hub code only when asked for

        load_pretrained(model, cfg)
    return model
