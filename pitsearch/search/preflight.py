"""Mistakes every trial of a sweep would hit, found before the study exists.

A sweep whose trials all fail is worse than an error: it stores a study of failed cells, and the fixed command
then resumes that study. So before anything is stored, the runner composes the space's example configs (which
together use every choice; pitsearch.search.space) and puts each through what a trial does before training,
without loading any data: the config checks, the device, and the model config resolved with the input size,
channels and classes its data set will give. An error that every example hits alike does not depend on the
swept values: it is raised as the one-line ConfigError a single run would give. (An error only some examples
hit belongs to those cells: they fail as trials, with their reason.)

The objectives are checked against the metrics a trial reports: the trainer's per-epoch METRIC_KEYS, the
post-training analyses the eval config turns on, and `macs` / `params`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from pitsearch.errors import ConfigError
from pitsearch.search.spec import STATIC_METRICS

# Native image size, channels and classes of the named data sets (what `load_dataset` gives with data.img_size
# null), so a sweep checks its models against the data without loading it; the tests load them and compare.
# synthetic and imagefolder take theirs from the data config.
NATIVE_SHAPES = {"mnist5k": (28, 1, 10), "digits": (8, 1, 10), "cifar10": (32, 3, 10), "cifar100": (32, 3, 100)}


def check_sweep(spec, configs: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> None:
    """Raise a ConfigError for an objective no trial reports, a config error every example config hits, or (with
    `sweep.match`) a variant whose model cannot be matched to the reference's cost. `labels` name the configs'
    variants in that last error."""
    check_objectives(spec.objectives, configs)
    check_trial_configs(configs)
    if getattr(spec, "match", None) is not None:
        from pitsearch.search.match import check_match

        check_match(spec.match, configs, labels)


# Each variant is one Hydra compose (tens of ms on a loaded 2-core CPU), so past this many the preflight solves the
# examples only: a combination they miss that has no solution still fails, as its trials, with its reason.
MAX_MATCHED_VARIANTS = 64


def preflight_configs(spec, composer) -> tuple[list[dict[str, Any]], list[str]]:
    """The configs `check_sweep` gets, with their variant labels: the space's examples, which together use every
    choice; with `sweep.match`, every variant of a finite space instead, because a match depends on the whole
    combination (a model that matches at one depth may not at another) and the grid runs every one."""
    rows = spec.space.example_values()
    if getattr(spec, "match", None) is not None and spec.space.is_categorical:
        variants: dict[str, dict[str, Any]] = {}
        for cell in spec.space.iter_cells():
            key = spec.space.variant_key(cell)
            if key not in variants:
                variants[key] = cell
            if len(variants) > MAX_MATCHED_VARIANTS:
                break
        if len(variants) <= MAX_MATCHED_VARIANTS:
            # each variant once (its first seed): the seed changes no cost, and the examples' rows come first so
            # every other check sees what it saw before
            seen = {spec.space.variant_key(row) for row in rows}
            rows = rows + [cell for key, cell in variants.items() if key not in seen]
    return ([composer.compose(spec.space.to_overrides(row)) for row in rows],
            [spec.space.variant_key(row) for row in rows])   # variant_key leaves the seed out


def reported_metrics(cfg: Mapping[str, Any]) -> list[str]:
    """Every metric a trial of `cfg` reports: one list, in the order the trainer logs them."""
    from pitsearch.analysis import metric_names
    from pitsearch.train import METRIC_KEYS

    return [*METRIC_KEYS, *metric_names(cfg.get("eval")), *STATIC_METRICS]


def check_objectives(objectives: Sequence[tuple[str, str]], configs: Sequence[Mapping[str, Any]]) -> None:
    from pitsearch.analysis import ROBUSTNESS_KINDS, metric_names

    reported = list(dict.fromkeys(name for cfg in configs for name in reported_metrics(cfg)))
    optional = metric_names({"spatial": True, "robustness": list(ROBUSTNESS_KINDS)})
    for i, (metric, _) in enumerate(objectives):
        if metric in reported:
            continue
        hint = (" (an analysis metric: turn it on with eval.spatial=true or eval.robustness=[...])"
                if metric in optional else "")
        raise ConfigError(f"sweep.objectives[{i}].metric",
                          f"{metric!r} is not a metric the trials report{hint}; valid: {', '.join(reported)}")


def check_trial_configs(configs: Sequence[Mapping[str, Any]]) -> None:
    errors: list[ConfigError] = []
    for cfg in configs:
        try:
            check_trial_config(cfg)
        except ConfigError as error:
            errors.append(error)
        else:
            return  # one example is fine: whatever the others hit belongs to their cells
    if errors and len({str(error) for error in errors}) == 1:
        error = errors[0]
        message = str(error)[len(error.field) + 2:]
        raise ConfigError(error.field, f"{message} (every trial of this sweep would fail with it; nothing was "
                                       "started)")


def check_trial_config(cfg: Mapping[str, Any]) -> None:
    """What `pitsearch.experiment.prepare` checks before it loads data and builds the model, with the data's
    shape taken from the data config."""
    from pitsearch.experiment import fill_model_from_data, validate_config
    from pitsearch.models import resolve_model_config
    from pitsearch.train import resolve_device

    validate_config(cfg)
    resolve_device(cfg["train"].get("device"))
    shape = data_shape(cfg["data"])
    model = fill_model_from_data(cfg["model"], shape) if shape is not None else dict(cfg["model"])
    resolve_model_config(model)


def data_shape(data_cfg: Mapping[str, Any]) -> SimpleNamespace | None:
    """The loaded data set's name, img_size, in_chans and num_classes (None where only loading tells: the class
    count of an image folder), or None for a data set this table does not know."""
    name = data_cfg.get("name")
    if name in NATIVE_SHAPES:
        img_size, in_chans, num_classes = NATIVE_SHAPES[name]
    elif name in ("synthetic", "imagefolder"):
        img_size, in_chans, num_classes = data_cfg.get("img_size"), data_cfg.get("in_chans", 3), \
            data_cfg.get("num_classes")
    else:
        return None
    if data_cfg.get("img_size") is not None:  # load_dataset resizes to it
        img_size = data_cfg["img_size"]
    return SimpleNamespace(name=name, img_size=img_size, in_chans=in_chans, num_classes=num_classes)
