"""Compute matching: re-size a model variant to a reference variant's MACs (or params) before it is trained.

A pooling ablation that compares `none` (no token reduction) with `conv` at the same widths compares models of
2.3-5.9x different cost. `match_model_config(variant, reference)` turns one knob of the variant until its closed-form
cost (pitsearch.profile, equal to the counted one) lands within `tolerance` of the reference's; nothing is built.

Knobs (`adjust`, tried in order; the first whose best setting lands within tolerance wins):

- `model.head_dims`: a uniform width scale s; each stage takes floor or ceil of s * head_dim (>= 1), every
  combination, and only when none of those lands within tolerance, values within 2 of s * head_dim
  (channels = heads x head_dim, heads kept). Change: sum of the head_dim changes.
- `model.depths`: the same number of blocks added to / removed from every stage (each keeps >= 1).
- `model.stem`: patch_size / stride pairs with stride <= patch <= r * stride, r = max(2, the original's
  patch / stride): from ViT's non-overlapping patches to PiT's 2x overlap. Change: |d patch| + |d stride|.
- `model.stride`: the stride alone, 1 .. patch_size (no pixel skipped); `model.patch_size`: the patch alone,
  stride .. img_size.

Every candidate is scored with the closed form, unvalidated (~20 us); they are ranked by |cost - reference| and
then by the size of the change, and validated in that order (presets.py's full validation: conv's channel
multiples, heads, grid sizes), so the winner is the closest *valid* setting. A variant already within tolerance
is left as it is: the tolerance says what the user counts as equal compute, and no change is the smallest.

Why the floor/ceil lattice for head_dims: a uniform integer head_dim moves pit_nano's MACs in steps of 20-30%
(28 px, stride 3, pool none: head_dim 6 -> 0.82x conv's MACs, 7 -> 1.07x), too coarse for a 3% tolerance; letting
each stage round either way (e.g. [7, 6, 7], 0.987x) gives steps of a few % while every head_dim stays within 1
of the common scale. Knobs never grow past GROWTH_LIMIT x their original size: a reference far out of reach (say a
224 px reference for a 28 px variant) is an error, not a 1000-block model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pitsearch.errors import ConfigError
from pitsearch.profile import COSTS, closed_form_cost

# pitsearch.models (torch) is imported inside the functions, as everywhere on the command-line path: a typo in
# --adjust is reported before torch loads (17 s on a loaded 2-core CPU, most of a profile command).

GROWTH_LIMIT = 8  # head_dims scale <= 8x, deepest stage <= 8x its depth
# head_dims stay within 1 of the common scale s*d (floor or ceil); only when none of those lands within tolerance,
# within 2: pit_nano at 28 px (stride 2, pool none -> conv's MACs) gets no closer than 0.968x with floor/ceil,
# 1.0003x with [5, 7, 5] at s*d = 5.8.
HEAD_DIM_RADIUS = 2
# Keys that say what a variant is; the rest (name, pretrained, timm_name) only label it.
_DESCRIBING_KEYS = ("depths", "heads", "head_dims", "patch_size", "stride", "pool", "mlp_ratio", "cls_pos_embed",
                    "img_size", "in_chans", "num_classes")


@dataclass(frozen=True)
class MatchResult:
    """A variant re-sized to the reference's cost. `knob` is None when the variant was already within tolerance.

    cfg: the matched, validated model config; value / reference_value / original_value: cost (`on`) of the
    matched variant, the reference and the variant before matching; changes: {"model.KEY": new value} for the keys
    that changed, original: the same keys' old values.
    """

    cfg: dict[str, Any]
    on: str
    value: int
    reference_value: int
    original_value: int
    ratio: float
    knob: str | None
    tolerance: float
    changes: dict[str, Any] = field(default_factory=dict)
    original: dict[str, Any] = field(default_factory=dict)

    def describe_change(self) -> str:
        """`model.head_dims [16, 16, 16] -> [7, 6, 7]`, or `unchanged`."""
        if not self.changes:
            return "unchanged"
        return ", ".join(f"{key} {self.original[key]} -> {value}" for key, value in self.changes.items())

    def log_params(self) -> dict[str, Any]:
        """Flat `matched.*` entries for MLflow params / tags: knob, costs, ratio, the change and the new values."""
        entries: dict[str, Any] = {
            "matched.on": self.on,
            "matched.knob": self.knob or "none",
            f"matched.{self.on}": self.value,
            f"matched.reference_{self.on}": self.reference_value,
            f"matched.original_{self.on}": self.original_value,
            "matched.ratio": round(self.ratio, 6),
            "matched.tolerance": self.tolerance,
            "matched.change": self.describe_change(),
        }
        entries.update({f"matched.{key}": value for key, value in self.changes.items()})
        return entries


def reference_config(variant_cfg: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The reference a sweep's `match.reference: {model.pool: conv}` names: the variant with those overrides.

    `model: NAME` starts from that preset instead, keeping only the variant's data shape (img_size, in_chans,
    num_classes), so `{model: vit_nano}` means "vit_nano on the same data".
    """
    from pitsearch.models import resolve_model_config

    variant = resolve_model_config(variant_cfg)
    if not isinstance(overrides, Mapping) or not overrides:
        raise ConfigError("match.reference", f"expected a mapping such as {{model.pool: conv}}, got {overrides!r}")
    changes = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not (key == "model" or key.startswith("model.")) or key == "model.":
            raise ConfigError("match.reference", f"keys must be model=NAME or model.KEY, got {key!r}")
        if key != "model":
            changes[key[len("model."):]] = value
    if "model" in overrides:
        shape = {key: variant[key] for key in ("img_size", "in_chans", "num_classes")}
        base: Any = overrides["model"]
    else:
        shape, base = {}, variant
    try:
        return resolve_model_config(base, **{**shape, **changes})
    except ConfigError as exc:
        raise ConfigError("match.reference", str(exc)) from None


def match_model_config(model_cfg: Any, reference_cfg: Any, on: str = "macs",
                       adjust: str | Sequence[str] = "model.head_dims", tolerance: float = 0.03,
                       label: str | None = None) -> MatchResult:
    """Re-size `model_cfg` (the variant) so its `on` cost is within `tolerance` (relative) of `reference_cfg`'s.

    Both configs are anything resolve_model_config takes (normally resolved dicts with the data shape filled in).
    `adjust`: one knob or a list (or a comma-separated string) of knobs tried in order, see the module docstring.
    `label` names the variant in the error; by default, the keys where it differs from the reference.
    Raises ConfigError (one line) for bad arguments and when no knob lands within tolerance; that message names
    the variant, the reference's cost and the closest cost reached (and with what).
    """
    from pitsearch.models import resolve_model_config

    knobs = check_match_args(on, adjust, tolerance)
    variant = resolve_model_config(model_cfg)
    try:
        reference = resolve_model_config(reference_cfg)
    except ConfigError as exc:
        raise ConfigError("match.reference", str(exc)) from None
    target = closed_form_cost(reference, on, validate=False)
    original = closed_form_cost(variant, on, validate=False)
    if _within(original, target, tolerance):
        return _result(variant, on, original, target, original, None, {}, tolerance, variant)
    closest = (abs(original - target), original, "the variant unchanged")
    for knob in knobs:
        for candidates in _KNOBS[knob](variant, on, target, tolerance):
            best = _first_valid(variant, _rank(variant, on, target, candidates))
            if best is None:
                continue
            cost, changes = best
            if abs(cost - target) < closest[0]:
                closest = (abs(cost - target), cost, _format_changes(variant, changes))
            if _within(cost, target, tolerance):
                return _result({**variant, **changes}, on, cost, target, original, knob, changes, tolerance, variant)
    name = label or _describe_variant(variant, reference)
    _, reached, how = closest
    raise ConfigError(
        ", ".join(knobs),
        f"cannot bring {name} within {tolerance * 100:g}% of the reference's {target:,} {_unit(on)}: the closest "
        f"valid setting reached {reached:,} ({reached / target:.3f}x) with {how}; try another knob or a larger "
        f"tolerance",
    )


# --- knobs ------------------------------------------------------------------------------------------------

def _head_dims_candidates(cfg: dict[str, Any], on: str, target: int, tolerance: float) -> Iterator[list]:
    dims = cfg["head_dims"]
    # head_dims = m * dims / gcd keeps every channel ratio, so whatever pooling step was valid stays valid (a
    # rounded uniform scale would not: [8, 16] * 1.3 -> [10, 21] breaks conv's multiple, and such a step cannot
    # even be built to count its params); the cost grows strictly with m, so bisect for the m that crosses.
    unit = math.gcd(*dims)

    def cost_at(multiple: int) -> int:
        vector = [multiple * d // unit for d in dims]
        if _channels_invalid(cfg, vector):  # only a registered type with a rule beyond multiples; search upwards
            return -1
        return closed_form_cost({**cfg, "head_dims": vector}, on, validate=False)

    low, high = 1, GROWTH_LIMIT * unit
    if cost_at(low) >= target:
        high = low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost_at(middle) < target else (low, middle)
    # The crossing scale lies in [(high - 1) / unit, high / unit]. Costs within tolerance need a scale within
    # ~tolerance of it (the cost grows at least linearly with the scale); the margin adds lattice steps of the
    # narrowest stage, so the closest setting is in range even when nothing is within tolerance.
    margin = (HEAD_DIM_RADIUS + 1) / min(dims)
    start = max(0.0, (high - 1) / unit * (1 - tolerance) - margin)
    stop = min(GROWTH_LIMIT, high / unit * (1 + tolerance) + margin)
    # The lattice near s*d only changes where s*d is an integer: one set of vectors per interval between those.
    cuts = {start, stop} | {k / d for d in dims for k in range(math.ceil(start * d), math.floor(stop * d) + 1)}
    points = sorted(cut for cut in cuts if start <= cut <= stop)
    for radius in range(1, HEAD_DIM_RADIUS + 1):  # lazily: the wider tier is scored only when needed
        vectors = {tuple(dims)}
        for left, right in zip(points, points[1:]):
            scale = (left + right) / 2  # s*d is never an integer here: floor < s*d < ceil
            vectors.update(itertools.product(*(
                range(max(1, math.floor(scale * d) - radius + 1), math.ceil(scale * d) + radius) for d in dims)))
        yield [({"head_dims": list(vector)}, sum(abs(v - d) for v, d in zip(vector, dims)))
               for vector in sorted(vectors) if all(v <= GROWTH_LIMIT * d for v, d in zip(vector, dims))]


def _depths_candidates(cfg: dict[str, Any], on: str, target: int, tolerance: float) -> Iterator[list]:
    depths = cfg["depths"]
    lowest, highest = 1 - min(depths), (GROWTH_LIMIT - 1) * max(depths)
    # The closed form is linear in a uniform depth change: two evaluations give the exact crossing.
    base = closed_form_cost(cfg, on, validate=False)
    step = closed_form_cost({**cfg, "depths": [d + 1 for d in depths]}, on, validate=False) - base
    crossing = (target - base) / step
    extras = {0} | {min(max(k, lowest), highest) for k in range(math.floor(crossing) - 1, math.ceil(crossing) + 2)}
    yield [({"depths": [d + k for d in depths]}, abs(k) * len(depths)) for k in sorted(extras)]


def _stem_pairs(cfg: dict[str, Any], pairs: Any) -> list:
    """Candidates from (patch, stride) pairs. The cost depends on the pair only through the patch and the grid
    side, so one pair per (patch, grid) is kept, the one closest to the original (for pit_b's 224 px stem this
    scores ~1,400 pairs instead of ~12,700)."""
    from pitsearch.models.pit import stem_grid

    patch0, stride0, img_size = cfg["patch_size"], cfg["stride"], cfg["img_size"]
    best: dict[tuple[int, int], tuple[int, int]] = {}
    for patch, stride in itertools.chain(pairs, [(patch0, stride0)]):
        key, change = (patch, stem_grid(img_size, patch, stride)), abs(patch - patch0) + abs(stride - stride0)
        if key not in best or (change, stride) < best[key]:
            best[key] = (change, stride)
    return [({"patch_size": patch, "stride": stride}, change) for (patch, _), (change, stride) in best.items()]


def _stem_candidates(cfg: dict[str, Any], on: str, target: int, tolerance: float) -> Iterator[list]:
    img_size = cfg["img_size"]
    overlap = max(2, math.ceil(cfg["patch_size"] / cfg["stride"]))
    yield _stem_pairs(cfg, ((patch, stride) for stride in range(1, img_size + 1)
                            for patch in range(stride, min(img_size, overlap * stride) + 1)))


def _stride_candidates(cfg: dict[str, Any], on: str, target: int, tolerance: float) -> Iterator[list]:
    yield _stem_pairs(cfg, ((cfg["patch_size"], stride) for stride in range(1, cfg["patch_size"] + 1)))


def _patch_size_candidates(cfg: dict[str, Any], on: str, target: int, tolerance: float) -> Iterator[list]:
    yield _stem_pairs(cfg, ((patch, cfg["stride"]) for patch in range(cfg["stride"], cfg["img_size"] + 1)))


# knob -> a generator of candidate tiers, each a list of (changes, change size); a later tier is made only when no
# setting of the earlier ones lands within tolerance. Every tier includes the variant unchanged.
_KNOBS: dict[str, Callable[[dict[str, Any], str, int, float], Iterator[list]]] = {
    "model.head_dims": _head_dims_candidates,
    "model.depths": _depths_candidates,
    "model.stem": _stem_candidates,
    "model.stride": _stride_candidates,
    "model.patch_size": _patch_size_candidates,
}
KNOBS = tuple(_KNOBS)


# --- ranking and helpers --------------------------------------------------------------------------------------

def _rank(cfg: dict[str, Any], on: str, target: int, candidates: list) -> list:
    """(cost, changes) best first: closest cost, then the smallest change, then the values (deterministic).

    Channel changes the pooling type cannot make (conv: C_out a multiple of C_in) are dropped before scoring, by
    the type's own `channel_problem`: such a pooling step cannot even be built to count its parameters."""
    scored = []
    for changes, change_size in candidates:
        if "head_dims" in changes and _channels_invalid(cfg, changes["head_dims"]):
            continue
        cost = closed_form_cost({**cfg, **changes}, on, validate=False)
        scored.append((abs(cost - target), change_size, sorted(changes.items()), cost, changes))
    scored.sort(key=lambda entry: entry[:3])
    return [(cost, changes) for _, _, _, cost, changes in scored]


def _channels_invalid(cfg: dict[str, Any], head_dims: list[int]) -> bool:
    from pitsearch.models.pooling import get_pool_class

    pool_class = get_pool_class(cfg["pool"])
    channels = [h * d for h, d in zip(cfg["heads"], head_dims)]
    return any(pool_class.channel_problem(c_in, c_out) is not None for c_in, c_out in zip(channels, channels[1:]))


def _first_valid(cfg: dict[str, Any], ranked: list) -> tuple[int, dict[str, Any]] | None:
    from pitsearch.models import validate_model_config

    for cost, changes in ranked:
        try:
            validate_model_config({**cfg, **changes})
        except ConfigError:
            continue
        return cost, changes
    return None


def _result(cfg: dict[str, Any], on: str, value: int, target: int, original_value: int, knob: str | None,
            changes: dict[str, Any], tolerance: float, variant: dict[str, Any]) -> MatchResult:
    from pitsearch.models import resolve_model_config

    changed = {key: new for key, new in changes.items() if variant[key] != new}
    return MatchResult(cfg=resolve_model_config(cfg), on=on, value=value, reference_value=target,
                       original_value=original_value, ratio=value / target, knob=knob, tolerance=tolerance,
                       changes={f"model.{key}": new for key, new in changed.items()},
                       original={f"model.{key}": variant[key] for key in changed})


def _within(value: int, target: int, tolerance: float) -> bool:
    return abs(value - target) <= tolerance * target


def _format_changes(variant: dict[str, Any], changes: dict[str, Any]) -> str:
    changed = [f"model.{key}={value}" for key, value in changes.items() if variant[key] != value]
    return " ".join(changed) or "the variant unchanged"


def _describe_variant(variant: dict[str, Any], reference: dict[str, Any]) -> str:
    differing = [f"model.{key}={variant[key]}" for key in _DESCRIBING_KEYS if variant[key] != reference[key]]
    if not differing:
        return f"variant {variant['name'] or 'custom'}"
    shown = " ".join(differing[:3]) + (" ..." if len(differing) > 3 else "")
    return f"variant {shown}"


def _unit(on: str) -> str:
    return "MACs" if on == "macs" else "params"


def check_match_args(on: Any, adjust: Any, tolerance: Any) -> list[str]:
    """The knobs named by `adjust`, after checking all three arguments (ConfigError naming match.on / .adjust /
    .tolerance). Needs no model config, so a sweep file can be checked before anything runs."""
    _check_on(on)
    knobs = _parse_knobs(adjust)
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and 0 <= tolerance < 1):
        raise ConfigError("match.tolerance", f"must be a number in [0, 1) (a relative error), got {tolerance!r}")
    return knobs


def _check_on(on: Any) -> None:
    if on not in COSTS:
        raise ConfigError("match.on", f"expected one of {', '.join(COSTS)}, got {on!r}")


def _parse_knobs(adjust: Any) -> list[str]:
    items = adjust.split(",") if isinstance(adjust, str) else adjust
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:  # a list, tuple or ListConfig
        raise ConfigError("match.adjust", f"expected a knob or a list of knobs ({', '.join(KNOBS)}), got {adjust!r}")
    knobs = [item.strip() if isinstance(item, str) else item for item in items]
    for knob in knobs:
        if knob not in _KNOBS:
            raise ConfigError("match.adjust", f"unknown knob {knob!r}; valid: {', '.join(KNOBS)}")
    return knobs
