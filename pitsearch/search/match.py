"""A sweep's compute matching, `sweep.match: {on, reference, adjust, tolerance}` (pitsearch.matching solves it).

Every trial whose model is not the reference has its model re-sized to the reference's cost before it is built:
`prepare` calls a `TrialMatch` with the model config filled from the data (img_size, in_chans, num_classes), so
the match is made for the data the trial really trains on. The seed does not change a model's cost, so a
variant's solution is the same in every trial; it is solved again per trial rather than cached, because it
takes milliseconds and a cache would be one more thing a spawned or remote worker has to rebuild.

What is recorded: the trial's `config` user attribute holds the matched model (it is the config that trained),
the `matched` user attribute a dict (the report's "matched" column), the MLflow run `matched.*` params
(MatchResult.log_params) and tags `matched.reference`, `matched.knob`, `matched.ratio` to group and filter by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pitsearch.errors import ConfigError

MATCH_KEYS = ("on", "reference", "adjust", "tolerance")
# The solver's own defaults, so `match: {reference: {model.pool: conv}}` alone is a complete request.
DEFAULTS = {"on": "macs", "adjust": "model.head_dims", "tolerance": 0.03}


@dataclass(frozen=True)
class SweepMatch:
    on: str
    reference: dict[str, Any]
    adjust: list[str]
    tolerance: float

    def as_node(self) -> dict[str, Any]:
        """The parsed `sweep.match` as plain keys (a YAML `on:` key arrives as True): what the study, the parent
        run's params and the workers get."""
        return {"on": self.on, "reference": dict(self.reference), "adjust": list(self.adjust),
                "tolerance": self.tolerance}

    def is_reference(self, model_cfg: Mapping[str, Any]) -> bool:
        """Whether a trial's model is the reference itself: its values at the reference's keys (`model` compares
        the preset name). Judged on the keys, not on the cost: the reference's trials are never re-sized."""
        from pitsearch.search.overrides import to_plain

        for key, value in self.reference.items():
            actual = model_cfg.get("name") if key == "model" else model_cfg.get(key[len("model."):])
            if to_plain(actual) != to_plain(value):
                return False
        return True

    def solve(self, model_cfg: Mapping[str, Any], label: str | None = None):
        """The MatchResult for a model config with the data shape filled in; a ConfigError names `sweep.match`."""
        from pitsearch.matching import match_model_config, reference_config

        try:
            reference = reference_config(model_cfg, self.reference)
            return match_model_config(model_cfg, reference, on=self.on, adjust=self.adjust,
                                      tolerance=self.tolerance, label=label)
        except ConfigError as error:
            raise ConfigError("sweep.match", f"{_message(error)} (adjust: {', '.join(self.adjust)})") from None


def parse_match(node: Any, swept: Sequence[str], known_paths: Sequence[str] | None) -> SweepMatch | None:
    """`sweep.match` checked without any model config (pitsearch.matching.check_match_args); None when unset."""
    from pitsearch.matching import check_match_args
    from pitsearch.search.overrides import to_plain

    if node is None or (isinstance(node, Mapping) and not node):
        return None
    if not isinstance(node, Mapping):
        raise ConfigError("sweep.match", f"must be a mapping such as {{on: macs, reference: {{model.pool: conv}}, "
                                         f"adjust: model.head_dims, tolerance: 0.03}}, got {node!r}")
    # YAML 1.1 reads an unquoted `on:` key as the boolean true (OmegaConf keeps it so); a command-line
    # `sweep.match.on=...` adds the string key, which wins as the later override.
    node = {**{("on" if key is True else key): value for key, value in node.items()},
            **({"on": node["on"]} if "on" in node else {})}
    unknown = sorted(map(str, set(node) - set(MATCH_KEYS)))
    if unknown:
        raise ConfigError(f"sweep.match.{unknown[0]}", f"unknown key; valid: {', '.join(MATCH_KEYS)}")
    values = {**DEFAULTS, **{k: v for k, v in node.items() if v is not None}}
    try:
        knobs = check_match_args(values["on"], to_plain(values["adjust"]), values["tolerance"])
    except ConfigError as error:
        raise ConfigError(f"sweep.{error.field}", _message(error)) from None
    reference = node.get("reference")
    if not isinstance(reference, Mapping) or not reference:
        raise ConfigError("sweep.match.reference", f"must be a mapping such as {{model.pool: conv}}, got {reference!r}")
    for key in reference:
        # The solver re-sizes model configs only: the reference differs from a variant in its model section.
        if not isinstance(key, str) or not (key == "model" or key.startswith("model.")):
            raise ConfigError(f"sweep.match.reference.{key}", "keys must be model (a preset name) or model.KEY")
        if key not in swept and known_paths is not None and key not in known_paths:
            raise ConfigError(f"sweep.match.reference.{key}", "is neither a swept parameter nor a config path")
    return SweepMatch(on=values["on"], reference={k: to_plain(v) for k, v in reference.items()}, adjust=knobs,
                      tolerance=float(values["tolerance"]))


class TrialMatch:
    """`prepare(..., adjust_model=TrialMatch(match, variant))`: re-sizes one trial's model and remembers how."""

    def __init__(self, match: SweepMatch, label: str):
        self.match, self.label = match, label
        self.result = None
        self.reference = False

    def __call__(self, model_cfg: dict[str, Any]) -> dict[str, Any]:
        if self.match.is_reference(model_cfg):
            self.reference = True
            return model_cfg
        self.result = self.match.solve(model_cfg, label=f"variant {self.label}")
        return self.result.cfg

    def user_attr(self) -> dict[str, Any]:
        """The trial's `matched` attribute: what the report's "matched" column shows."""
        if self.result is None:
            return {"reference": True, "on": self.match.on}
        r = self.result
        return {"reference": False, "on": r.on, "knob": r.knob, "value": r.value, "reference_value": r.reference_value,
                "original_value": r.original_value, "ratio": r.ratio, "tolerance": r.tolerance,
                "changes": r.changes, "original": r.original}

    def params(self) -> dict[str, Any]:
        return {"matched.reference": "true"} if self.result is None else self.result.log_params()

    def tags(self) -> dict[str, str]:
        if self.result is None:
            return {"matched.reference": "true"}
        return {"matched.reference": "false", "matched.knob": self.result.knob or "none",
                "matched.ratio": f"{self.result.ratio:.4f}"}


def check_match(match: SweepMatch, configs: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> list:
    """Solve every given config's variant before the study exists (the preflight): a variant with no solution in
    range is one line naming it and the closest cost reached. Configs whose model or data shape cannot be known
    without loading data are left to their trials. Returns [(label, MatchResult or None for the reference)]."""
    from pitsearch.experiment import fill_model_from_data
    from pitsearch.models import resolve_model_config
    from pitsearch.search.preflight import data_shape

    solved = []
    for i, cfg in enumerate(configs):
        shape = data_shape(cfg["data"])
        if shape is None or shape.num_classes is None or shape.img_size is None:
            continue
        try:
            model = resolve_model_config(fill_model_from_data(cfg["model"], shape))
        except ConfigError:
            continue   # an error of this cell's config: its trials fail with it (pitsearch.search.preflight)
        label = labels[i] if labels is not None else None
        if match.is_reference(model):
            solved.append((label, None))
            continue
        solved.append((label, match.solve(model, label=f"variant {label}" if label else None)))
    return solved


def _message(error: ConfigError) -> str:
    return str(error)[len(error.field) + 2:]
