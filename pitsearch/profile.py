"""What a model costs: exact parameter count, multiply-adds (MACs) with attention counted, per-stage shapes.

MACs follow the PiT paper's "FLOPs" (one multiply-add = 1): conv, linear and the two attention matmuls
(Q K^T and A V); softmax, GELU, LayerNorm and residual adds are left out. They are counted with
FlopCounterMode / 2 on one batch-1 forward. The math attention path is forced because FlopCounterMode has no
formula for the fused CPU SDPA kernel and would silently drop the attention matmuls (0.71-0.96x the truth).
`closed_form_macs` gives the same number from the config alone (no forward) as a cross-check.

Command line (Hydra-style overrides, no Hydra needed):

    python -m pitsearch.profile model=pit_s [model.img_size=32 model.patch_size=4 ...] [--json]

Null img_size / in_chans / num_classes (no data config here) mean 224 / 3 / 1000.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

USAGE = "python -m pitsearch.profile model=NAME [model.KEY=VALUE ...] [--json]"


def count_macs(model: Any, img_size: int, in_chans: int) -> int:
    """Multiply-adds of one batch-1 forward. The model is left exactly as found (mode and requires_grad)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    first_param = next(model.parameters())
    images = torch.zeros(1, in_chans, img_size, img_size, device=first_param.device, dtype=first_param.dtype)
    was_training = model.training
    grad_flags = [param.requires_grad for param in model.parameters()]
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        # Under no_grad, FlopCounterMode's module tracker asserts on views of requires-grad parameters
        # (cls_token.expand); switching requires_grad off for the count avoids it.
        model.requires_grad_(False)
        # timm's Attention may call fused SDPA (chosen when it was built); the MATH backend decomposes it into
        # matmuls the counter sees, without rebuilding or mutating the model.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(images)
    finally:
        model.train(was_training)
        for param, flag in zip(model.parameters(), grad_flags):
            param.requires_grad_(flag)
    return counter.get_total_flops() // 2


def model_stats(model: Any, img_size: int | None = None) -> dict[str, Any]:
    """Params, MACs and per-stage shapes of `model` at `img_size` (default: the size it was built for).

    Returns {"params", "macs", "gmacs", "img_size", "in_chans", "stages"}; each stage is a dict with grid
    ("HxW"), tokens (incl. the class token), channels, depth, heads, head_dim, token_stride and pool.
    Works on a model on any device, including `meta` (shapes only, no memory for weights or activations).
    """
    built_for = getattr(model, "img_size", None)
    img_size = img_size or built_for or 224
    if built_for is not None and img_size != built_for:
        # The position embedding fixes the grid; a forward at another size would fail deep inside.
        raise ValueError(f"the model was built for {built_for} px images, not {img_size}; rebuild it for that size")
    in_chans = getattr(model, "in_chans", 3)
    macs = count_macs(model, img_size, in_chans)
    stages = model.stage_summaries() if hasattr(model, "stage_summaries") else []
    return {
        "params": sum(param.numel() for param in model.parameters()),
        "macs": macs,
        "gmacs": macs / 1e9,
        "img_size": img_size,
        "in_chans": in_chans,
        "stages": stages,
    }


def closed_form_macs(cfg: Any) -> int:
    """MACs from the config alone (preset name, dict or DictConfig), summed like FlopCounterMode / 2.

    stem H0*W0*C0*in_chans*p^2 + per block (4*N*C^2 + 2*N*C*hidden + 2*N^2*C) with N = H*W + 1 tokens and
    hidden = int(C * mlp_ratio) + each pooling step's own formula (pooling.py) + head C_last * classes.
    """
    from pitsearch.models import resolve_model_config
    from pitsearch.models.pit import NUM_CLS_TOKENS, stage_layout
    from pitsearch.models.pooling import get_pool_class

    cfg = resolve_model_config(cfg)
    channels = [h * d for h, d in zip(cfg["heads"], cfg["head_dims"])]
    layout = stage_layout(cfg["img_size"], cfg["patch_size"], cfg["stride"], cfg["pool"], len(channels))
    height0, width0 = layout[0]["grid"]
    macs = height0 * width0 * channels[0] * cfg["in_chans"] * cfg["patch_size"] ** 2
    for s, (depth, width) in enumerate(zip(cfg["depths"], channels)):
        height, wide = layout[s]["grid"]
        tokens = height * wide + NUM_CLS_TOKENS
        hidden = int(width * cfg["mlp_ratio"])
        macs += depth * (4 * tokens * width**2 + 2 * tokens * width * hidden + 2 * tokens**2 * width)
        if s > 0:
            pool_class = get_pool_class(cfg["pool"])
            macs += pool_class.closed_form_macs(channels[s - 1], width, layout[s]["grid"], NUM_CLS_TOKENS)
    return macs + channels[-1] * cfg["num_classes"]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2 (argparse would add the usage block)
        raise _UsageError(message)


def _parse_overrides(tokens: list[str]) -> tuple[str, dict[str, Any]]:
    """`model=NAME` and `model.KEY=VALUE` (OmegaConf dotlist syntax, so lists read as `[1,2,3]`)."""
    from omegaconf import OmegaConf

    preset, dotlist = None, []
    for token in tokens:
        key = token.split("=", 1)[0]
        if "=" in token and key == "model":
            preset = token.split("=", 1)[1]
        elif "=" in token and key.startswith("model.") and len(key) > len("model."):
            dotlist.append(token)
        else:
            raise _UsageError(f"unknown argument {token!r}; expected model=NAME or model.KEY=VALUE")
    if not preset:
        from pitsearch.models import list_presets

        raise _UsageError(f"model=NAME is required; presets: {', '.join(list_presets())}")
    try:
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist), resolve=True).get("model", {})
    except Exception as exc:  # OmegaConf grammar errors span several lines; keep the first
        raise _UsageError(f"cannot parse overrides: {str(exc).splitlines()[0]}") from None
    return preset, overrides


def profile_config(preset: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolved config and its stats. Built on the meta device: counting needs shapes only, so even pit_b or a
    224 px model with a tiny stride profiles in well under a second and without allocating weights."""
    import torch

    from pitsearch.models import build_model, resolve_model_config

    cfg = resolve_model_config(preset, **{**overrides, "pretrained": False})
    with torch.device("meta"):
        model = build_model(cfg)
    return cfg, model_stats(model, cfg["img_size"])


def _print_table(cfg: dict[str, Any], stats: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    from pitsearch.console import make_console

    console = make_console(stderr=False)
    console.print(f"model {cfg['name'] or 'custom'}: {cfg['img_size']} px, {cfg['in_chans']} channels, "
                  f"{cfg['num_classes']} classes, pool {cfg['pool']}")
    console.print(f"params {stats['params']:,}")
    console.print(f"MACs   {stats['gmacs']:.3f} G ({stats['macs']:,})")
    table = Table("stage", "pool", "grid", "tokens", "channels", "heads", "head dim", "depth", "stride",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for stage in stats["stages"]:
        table.add_row(*(str(value) for value in (
            stage["stage"], stage["pool"] or "-", stage["grid"], stage["tokens"], stage["channels"],
            stage["heads"], stage["head_dim"], stage["depth"], stage["token_stride"])))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pitsearch.profile", usage=USAGE,
                     description="Print a model's parameters, MACs (attention counted) and per-stage shapes.")
    parser.add_argument("overrides", nargs="*", help="model=NAME (a conf/model preset) and model.KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    from pitsearch.errors import ConfigError

    try:
        args = parser.parse_args(argv)
        preset, overrides = _parse_overrides(args.overrides)
        cfg, stats = profile_config(preset, overrides)
    except (_UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": cfg, **stats}, indent=2))
    else:
        _print_table(cfg, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
