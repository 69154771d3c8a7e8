"""Weights from timm into pitsearch models: PiT (`pit_*_224`) and DeiT/ViT (`deit_*_patch16_224`, `vit_*_patch16_224`).

Key maps (pitsearch names were chosen to make them short):

| timm PiT (>= 0.9)                  | official naver-ai/pit | pitsearch                          |
|------------------------------------|-----------------------|------------------------------------|
| transformers.{s}.blocks.{j}.*      | same                  | stages.{s}.blocks.{j}.*            |
| transformers.{s}.pool.{conv,fc}.*  | pools.{s-1}.*         | stages.{s}.pool.{conv,fc}.*        |
| patch_embed.conv, pos_embed, cls_token, norm, head | same  | same                               |

| timm ViT / DeiT                    | pitsearch (one stage, `cls_pos_embed: true`)                 |
|------------------------------------|--------------------------------------------------------------|
| pos_embed (1, 1 + H*W, D)          | cls_pos_embed (1, 1, D) + pos_embed (1, D, H, W)             |
| patch_embed.proj.*                 | patch_embed.conv.*                                           |
| blocks.{j}.*                       | stages.0.blocks.{j}.*                                        |
| cls_token, norm, head              | same                                                         |

Anything that does not fit (distilled heads, register tokens, other sizes) raises ConfigError with one line.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from pitsearch.errors import ConfigError

# Which config field to blame when a tensor's shape differs from the model's.
_SHAPE_FIELDS = {
    "pos_embed": "model.img_size",
    "patch_embed.conv.weight": "model.in_chans",
    "head.weight": "model.num_classes",
    "head.bias": "model.num_classes",
}
_HEAD_KEYS = ("head.weight", "head.bias")


def _convert_pit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"^transformers\.", "stages.", key)
        # Official checkpoints keep the pools in their own list, pool n sitting before stage n + 1.
        key = re.sub(r"^pools\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) + 1}.pool.", key)
        converted[key] = tensor
    return converted


def _convert_vit(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state_dict.items():
        if key == "pos_embed":
            # DeiT's (1, 1 + H*W, D) includes the class position; pitsearch keeps the spatial part as NCHW.
            num_patches = tensor.shape[1] - 1
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ConfigError("model", f"{source}: pos_embed has {num_patches} patch positions, not a square grid")
            converted["cls_pos_embed"] = tensor[:, :1]
            converted["pos_embed"] = tensor[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).contiguous()
        elif key.startswith("patch_embed.proj."):
            converted["patch_embed.conv." + key.removeprefix("patch_embed.proj.")] = tensor
        elif key.startswith("blocks."):
            converted["stages.0." + key] = tensor
        else:
            converted[key] = tensor
    return converted


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A timm PiT / ViT / DeiT (or official PiT) state dict renamed and reshaped to pitsearch's layout."""
    keys = set(state_dict)
    if "head_dist.weight" in keys or "dist_token" in keys:
        raise ConfigError("model", f"{source} is a distilled model (two class tokens); pitsearch builds one")
    if any(key.startswith(("transformers.", "pools.")) for key in keys):
        return _convert_pit(state_dict)
    if any(key.startswith("blocks.") for key in keys):
        return _convert_vit(state_dict, source)
    raise ConfigError("model", f"{source} is neither a timm PiT (transformers.*) nor a ViT/DeiT (blocks.*) state dict")


def _check_keys(own: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if "cls_pos_embed" in unexpected:
        raise ConfigError("model.cls_pos_embed", f"{source} has a class-token position embedding; set it to true")
    if "cls_pos_embed" in missing:
        raise ConfigError("model.cls_pos_embed", f"{source} has no class-token position embedding; set it to false")
    if missing or unexpected:
        raise ConfigError("model", f"{source} does not match this architecture: "
                                   f"{len(missing)} keys missing (e.g. {missing[:3]}), "
                                   f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for key, tensor in converted.items():
        if tensor.shape != own[key].shape:
            raise ConfigError(_SHAPE_FIELDS.get(key, "model"), f"{source}: {key} has shape {tuple(tensor.shape)}, "
                                                                f"the model's is {tuple(own[key].shape)}")


def load_timm_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, *,
                         keep_head: bool = False) -> None:
    """Copy a timm PiT or ViT/DeiT state dict into a matching pitsearch model (in place).

    `source` names the weights in error messages (e.g. "timm pit_s_224"). With keep_head=True the model keeps its
    own classifier (fine-tuning to another label set); every other tensor must match in name and shape, else
    ConfigError names the config field to change.
    """
    converted = convert_timm_state_dict(state_dict, source)
    own = model.state_dict()
    if keep_head:
        converted.update({key: own[key] for key in _HEAD_KEYS})
    _check_keys(own, converted, source)
    model.load_state_dict(converted, strict=True)


def _create_timm_model(timm_name: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(timm_name, pretrained=pretrained)
    except Exception as exc:  # network, hub cache, unknown name: all end as one line for the user
        first_line = (str(exc).strip().splitlines() or [""])[0]
        what = "fetch timm's pretrained weights" if pretrained else "create the timm model"
        raise ConfigError("model.pretrained" if pretrained else "model.timm_name",
                          f"could not {what} for {timm_name!r}: {type(exc).__name__}: {first_line}") from None


def copy_from_timm(model: nn.Module, cfg: dict[str, Any], pretrained: bool = True) -> None:
    """Copy the weights of timm's cfg["timm_name"] (pretrained, or freshly initialised) into `model`.

    A different num_classes keeps the model's freshly initialised head; other differences (img_size, in_chans)
    are errors, because timm's weights fix the position grid and the stem.
    """
    timm_model = _create_timm_model(cfg["timm_name"], pretrained=pretrained)
    keep_head = getattr(timm_model, "num_classes", None) != cfg["num_classes"]
    load_timm_state_dict(model, timm_model.state_dict(), f"timm {cfg['timm_name']}", keep_head=keep_head)


def load_pretrained(model: nn.Module, cfg: dict[str, Any]) -> None:
    """`model.pretrained: true` in build_model: start from timm's pretrained weights."""
    copy_from_timm(model, cfg, pretrained=True)


def from_timm(preset_name: str, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """The pitsearch preset `preset_name` carrying the weights of its timm counterpart (`timm_name`).

    pretrained=False copies a randomly initialised timm model (no download), e.g. to check equivalence offline.
    """
    from pitsearch.models import build_model, resolve_model_config

    cfg = resolve_model_config(preset_name, **{**overrides, "pretrained": False})
    if not cfg["timm_name"]:
        raise ConfigError("model.timm_name", f"preset {preset_name!r} has no timm counterpart")
    model = build_model(cfg)
    copy_from_timm(model, cfg, pretrained=pretrained)
    model.model_config["pretrained"] = pretrained
    return model
