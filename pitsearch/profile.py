"""What a model costs: exact parameter count, multiply-adds (MACs) with attention counted, per-stage shapes.

MACs follow the PiT paper's "FLOPs" (one multiply-add = 1): conv, linear and the two attention matmuls
(Q K^T and A V); softmax, GELU, LayerNorm and residual adds are left out. They are counted with
FlopCounterMode / 2 on one batch-1 forward. The math attention path is forced because FlopCounterMode has no
formula for the fused CPU SDPA kernel and would silently drop the attention matmuls (0.71-0.96x the truth).
`closed_form_macs` gives the same number from the config alone (no forward) as a cross-check.

Command line (Hydra-style overrides, no Hydra needed):

    python -m pitsearch.profile model=pit_s [model.img_size=32 model.patch_size=4 ...] [--json]

Null img_size / in_chans / num_classes (no data config here) mean 224 / 3 / 1000; the nano presets leave them
null, so give `model.img_size=28 model.in_chans=1 model.num_classes=10` for their MNIST shape.

`--match-to model.KEY=VALUE` (repeatable; `model=NAME` starts from another preset on the same data) prints the
variant re-sized to that reference's cost instead (pitsearch.matching), e.g. `none` pooling at conv's MACs:

    python -m pitsearch.profile model=pit_nano model.img_size=28 model.in_chans=1 model.num_classes=10 \
        model.stride=3 model.pool=none --match-to model.pool=conv [--match-on macs|params] \
        [--adjust model.head_dims,model.depths] [--tolerance 0.03] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any

USAGE = ("python -m pitsearch.profile model=NAME [model.KEY=VALUE ...] [--match-to model.KEY=VALUE ...] "
         "[--match-on macs|params] [--adjust KNOB[,KNOB...]] [--tolerance 0.03] [--json]")
# The matcher names its arguments as a sweep's `match:` block does; the command line names its flags.
_MATCH_FLAGS = {"match.on": "--match-on", "match.adjust": "--adjust", "match.tolerance": "--tolerance",
                "match.reference": "--match-to"}


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


COSTS = ("macs", "params")


def closed_form_macs(cfg: Any) -> int:
    """MACs from the config alone (preset name, dict or DictConfig), summed like FlopCounterMode / 2.

    stem H0*W0*C0*in_chans*p^2 + per block (4*N*C^2 + 2*N*C*hidden + 2*N^2*C) with N = H*W + 1 tokens and
    hidden = int(C * mlp_ratio) + each pooling step's own formula (pooling.py) + head C_last * classes.
    """
    return closed_form_cost(cfg, "macs")


def closed_form_params(cfg: Any) -> int:
    """Parameters from the config alone, equal to the built model's count (tests check every preset).

    stem (in_chans*p^2 + 1)*C0 + pos C0*H0*W0 + class token (and its position when cls_pos_embed) C0 each
    + per block 4*C^2 + 2*C*hidden + 9*C + hidden (qkv, proj, fc1, fc2 with biases, two LayerNorms)
    + each pooling step (counted on a meta-built module, see _pool_params) + norm 2*C_last + head (C_last+1)*K.
    """
    return closed_form_cost(cfg, "params")


def closed_form_cost(cfg: Any, on: str = "macs", validate: bool = True) -> int:
    """`closed_form_macs` or `closed_form_params` by name (`on` in COSTS).

    validate=False takes `cfg` as a full dict from resolve_model_config (or a copy with some values changed) and
    skips resolution: that costs ~80 us of the ~100 us a call takes (2-core CPU), and the matcher
    (pitsearch.matching) scores hundreds of candidates, validating only those it ranks first. The caller then
    vouches for the channels: params of a pooling step its type cannot build (conv: C_out not a multiple of
    C_in) raise ValueError; any other invalid value gives a meaningless number.
    """
    from pitsearch.models import resolve_model_config

    if on not in COSTS:
        raise ValueError(f"unknown cost {on!r}; expected one of {COSTS}")
    if validate:
        cfg = resolve_model_config(cfg)
    return _macs(cfg) if on == "macs" else _params(cfg)


def _macs(cfg: dict[str, Any]) -> int:
    from pitsearch.models.pit import NUM_CLS_TOKENS, stage_layout
    from pitsearch.models.pooling import get_pool_class

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


def _params(cfg: dict[str, Any]) -> int:
    from pitsearch.models.pit import NUM_CLS_TOKENS, stem_grid
    from pitsearch.models.pooling import get_pool_class

    channels = [h * d for h, d in zip(cfg["heads"], cfg["head_dims"])]
    side = stem_grid(cfg["img_size"], cfg["patch_size"], cfg["stride"])
    width0 = channels[0]
    params = (cfg["in_chans"] * cfg["patch_size"] ** 2 + 1) * width0 + width0 * side * side
    params += NUM_CLS_TOKENS * width0 * (2 if cfg["cls_pos_embed"] else 1)
    for s, (depth, width) in enumerate(zip(cfg["depths"], channels)):
        hidden = int(width * cfg["mlp_ratio"])
        params += depth * (4 * width**2 + 2 * width * hidden + 9 * width + hidden)
        if s > 0:
            params += _pool_params(get_pool_class(cfg["pool"]), channels[s - 1], width)
    return params + 2 * channels[-1] + (channels[-1] + 1) * cfg["num_classes"]


@functools.lru_cache(maxsize=4096)
def _pool_params(pool_class: type, in_channels: int, out_channels: int) -> int:
    """Parameters of one pooling step, counted on a module built on the meta device: exact for every registered
    type, new ones included, with no per-type formula here to drift from pooling.py. A build costs ~3 ms
    (2-core CPU), hence the cache (keyed by class, not name, so a type registered again is counted again); a
    matching run needs a few dozen distinct channel pairs."""
    import torch

    with torch.device("meta"):
        module = pool_class(in_channels, out_channels)
    return sum(param.numel() for param in module.parameters())


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2 (argparse would add the usage block)
        raise _UsageError(message)


def _parse_overrides(tokens: list[str], what: str = "") -> tuple[str | None, dict[str, Any]]:
    """`model=NAME` and `model.KEY=VALUE` (OmegaConf dotlist syntax, so lists read as `[1,2,3]`). model=NAME is
    required unless `what` names an option (`--match-to`), whose errors it prefixes."""
    from omegaconf import OmegaConf

    preset, dotlist = None, []
    for token in tokens:
        key = token.split("=", 1)[0]
        if "=" in token and key == "model":
            preset = token.split("=", 1)[1]
        elif "=" in token and key.startswith("model.") and len(key) > len("model."):
            dotlist.append(token)
        else:
            raise _UsageError(f"{what}unknown argument {token!r}; expected model=NAME or model.KEY=VALUE")
    if not preset and not what:
        from pitsearch.models import list_presets

        raise _UsageError(f"model=NAME is required; presets: {', '.join(list_presets())}")
    try:
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist), resolve=True).get("model", {})
    except Exception as exc:  # OmegaConf grammar errors span several lines; keep the first
        raise _UsageError(f"{what}cannot parse overrides: {str(exc).splitlines()[0]}") from None
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


def match_config(preset: str, overrides: dict[str, Any], match_to: list[str], on: str, adjust: str,
                 tolerance: float) -> dict[str, Any]:
    """What `--match-to` prints: the matched config, its change, MACs and params beside the reference's and the
    unmatched variant's. The matched model is built on the meta device and counted, and must equal the closed
    form the matcher solved with."""
    from pitsearch.matching import check_match_args

    # Flag typos first: importing torch takes most of a profile command (17 s on a loaded 2-core CPU).
    check_match_args(on, adjust, tolerance)
    reference_preset, reference_overrides = _parse_overrides(match_to, "--match-to: ")
    import torch

    from pitsearch.matching import match_model_config, reference_config
    from pitsearch.models import build_model, resolve_model_config

    variant = resolve_model_config(preset, **{**overrides, "pretrained": False})
    reference_keys = {f"model.{key}": value for key, value in reference_overrides.items()}
    if reference_preset:
        reference_keys["model"] = reference_preset
    reference = {**reference_config(variant, reference_keys), "pretrained": False}
    result = match_model_config(variant, reference, on=on, adjust=adjust, tolerance=tolerance)
    with torch.device("meta"):
        stats = model_stats(build_model(result.cfg), result.cfg["img_size"])
    closed = {"macs": closed_form_macs(result.cfg), "params": closed_form_params(result.cfg)}
    if closed != {"macs": stats["macs"], "params": stats["params"]}:
        raise RuntimeError(f"closed form {closed} differs from the counted model {stats}: a bug in profile.py")
    costs = {"macs": stats["macs"], "params": stats["params"], "reference_macs": closed_form_macs(reference),
             "reference_params": closed_form_params(reference), "original_macs": closed_form_macs(variant),
             "original_params": closed_form_params(variant)}
    return {"knob": result.knob, "on": result.on, "tolerance": result.tolerance, "ratio": result.ratio,
            "changes": result.changes, "original": result.original, **costs, "model": result.cfg,
            "reference": reference, "stages": stats["stages"]}


def _print_match(report: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    from pitsearch.console import make_console

    console = make_console(stderr=False)
    cfg = report["model"]
    console.print(f"model {cfg['name'] or 'custom'}: {cfg['img_size']} px, {cfg['in_chans']} channels, "
                  f"{cfg['num_classes']} classes, pool {cfg['pool']}", highlight=False)
    unit = "MACs" if report["on"] == "macs" else "params"
    how = ", ".join(f"{key} {report['original'][key]} -> {value}" for key, value in report["changes"].items())
    console.print(f"matched on {unit} within {report['tolerance'] * 100:g}%: {how or 'unchanged (already within)'}",
                  highlight=False)
    if report["changes"]:
        overrides = " ".join(f"{key}={json.dumps(value, separators=(',', ':'))}"
                             for key, value in report["changes"].items())
        console.print(f"overrides: {overrides}", highlight=False, markup=False)
    table = Table("", "matched", "reference", "ratio", "unmatched", box=box.SIMPLE_HEAD, pad_edge=False)
    for key, label in (("macs", "MACs"), ("params", "params")):
        value, reference_value = report[key], report[f"reference_{key}"]
        table.add_row(label, f"{value:,}", f"{reference_value:,}", f"{value / reference_value:.3f}",
                      f"{report[f'original_{key}']:,}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pitsearch.profile", usage=USAGE,
                     description="Print a model's parameters, MACs (attention counted) and per-stage shapes; with "
                                 "--match-to, the model re-sized to the cost of a reference variant.")
    parser.add_argument("overrides", nargs="*", help="model=NAME (a conf/model preset) and model.KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--match-to", action="append", metavar="model.KEY=VALUE",
                        help="the reference: this model with these overrides (repeat for several keys), or "
                             "model=NAME, another preset on the same data")
    parser.add_argument("--match-on", choices=("macs", "params"), help="the cost to match (default macs)")
    parser.add_argument("--adjust", metavar="KNOB[,KNOB...]",
                        help="knobs tried in order (default model.head_dims; also model.depths, model.stem, "
                             "model.stride, model.patch_size)")
    parser.add_argument("--tolerance", type=float, help="relative cost difference accepted (default 0.03)")
    from pitsearch.errors import ConfigError

    try:
        args = parser.parse_intermixed_args(argv)
        preset, overrides = _parse_overrides(args.overrides)
        if not args.match_to:
            given = [flag for flag, value in (("--match-on", args.match_on), ("--adjust", args.adjust),
                                              ("--tolerance", args.tolerance)) if value is not None]
            if given:
                raise _UsageError(f"{given[0]}: needs --match-to model.KEY=VALUE (the reference to match)")
            cfg, stats = profile_config(preset, overrides)
        else:
            report = match_config(preset, overrides, args.match_to, args.match_on or "macs",
                                  args.adjust or "model.head_dims", 0.03 if args.tolerance is None else args.tolerance)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        flag = _MATCH_FLAGS.get(exc.field)
        print(f"error: {flag}: {str(exc)[len(exc.field) + 2:]}" if flag else f"error: {exc}", file=sys.stderr)
        return 2
    if args.match_to and args.json:
        print(json.dumps(report, indent=2))
    elif args.match_to:
        _print_match(report)
    elif args.json:
        print(json.dumps({"model": cfg, **stats}, indent=2))
    else:
        _print_table(cfg, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
