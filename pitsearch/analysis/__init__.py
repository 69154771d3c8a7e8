"""Post-training analyses of one trained model, chosen by the `eval` config group (conf/eval/default.yaml).

`run_analyses(model, dataset, eval_cfg, tracker, run_id)` runs what `eval_cfg` asks for once training is over:
the spatial-interaction profile of the attention (pitsearch.analysis.spatial) and the robustness accuracies
(pitsearch.analysis.robustness), and logs them to the run. Nothing here runs during training, and with the
defaults (everything off) it returns at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pitsearch.analysis.robustness import clean_accuracy, fgsm_accuracy, occlusion_accuracy
from pitsearch.analysis.spatial import METRICS as SPATIAL_METRICS
from pitsearch.analysis.spatial import capture_attention, spatial_figure, spatial_profile, summary_metrics
from pitsearch.errors import ConfigError

__all__ = [
    "ROBUSTNESS_KINDS",
    "capture_attention",
    "clean_accuracy",
    "fgsm_accuracy",
    "load_eval_defaults",
    "metric_names",
    "occlusion_accuracy",
    "resolve_eval_config",
    "run_analyses",
    "spatial_figure",
    "spatial_profile",
    "validate_eval_config",
]

ROBUSTNESS_KINDS = ("occlusion", "fgsm")


def load_eval_defaults() -> dict[str, Any]:
    """EvalConfig's defaults (pitsearch.config.schema), also used when a config has no `eval` node."""
    from pitsearch.config.schema import EvalConfig, defaults

    return defaults(EvalConfig)


def resolve_eval_config(cfg: Any) -> dict[str, Any]:
    """The defaults overlaid with `cfg` (dict, DictConfig or None), validated."""
    return validate_eval_config(cfg)


def validate_eval_config(cfg: Any) -> dict[str, Any]:
    """Raise a one-line ConfigError naming `eval.<key>`; keys left out take their defaults. Types, unknown keys
    and ranges are EvalConfig's (pitsearch.config.schema); the kinds of robustness are checked here. Returns the
    full config."""
    from pitsearch.config import checked

    cfg = checked("eval", cfg)
    for kind in cfg["robustness"] or []:
        if kind not in ROBUSTNESS_KINDS:
            raise ConfigError("eval.robustness", f"unknown kind {kind!r}; valid: {', '.join(ROBUSTNESS_KINDS)}")
    return cfg


def metric_names(eval_cfg: Any) -> list[str]:
    """The scalar metrics `run_analyses` returns for `eval_cfg` (a trial's final metrics hold them beside the
    trainer's METRIC_KEYS): a sweep checks its objectives against them before any trial runs."""
    cfg = resolve_eval_config(eval_cfg)
    names = [f"spatial/mean_{key}" for key in SPATIAL_METRICS] if cfg["spatial"] else []
    kinds = list(dict.fromkeys(cfg["robustness"] or []))
    if kinds:
        names += ["robust/clean_acc", *(f"robust/{kind}_acc" for kind in kinds)]
    return names


def run_analyses(model, dataset, eval_cfg: Any, tracker=None, run_id: str | None = None) -> dict[str, Any]:
    """Run the analyses `eval_cfg` asks for on a trained `model` and `dataset` (both on the same device).

    Returns {"metrics": {name: value}, "spatial": profile or None}: metrics hold `robust/clean_acc`,
    `robust/occlusion_acc`, `robust/fgsm_acc` (those asked for) and the `spatial/mean_*` means over blocks;
    the profile holds per-block lists (`interaction_ratio`, `distance_px`, `entropy`, `stage_of_block`) and
    `stage_boundaries`. JSON-serialisable, so it fits Optuna user attributes.

    With a tracker, logs to `run_id` (which must still be open): the summary metrics at step 0, the per-block
    metrics `spatial/interaction_ratio|distance_px|entropy` with step = block index, `spatial.png` and
    `spatial.json`.
    """
    from pitsearch.augment import BatchAugment

    cfg = resolve_eval_config(eval_cfg)
    augment = BatchAugment(None, dataset, dataset.num_classes)  # eval() = normalisation only
    metrics: dict[str, float] = {}
    profile = None
    if cfg["spatial"]:
        images = augment.eval(dataset.val_x[:cfg["spatial_images"]])
        profile = spatial_profile(model, images, threshold=float(cfg["spatial_threshold"]))
        metrics.update(summary_metrics(profile))
    kinds = list(dict.fromkeys(cfg["robustness"] or []))  # keep order, drop repeats
    if kinds:
        cap = cfg["robustness_images"]
        metrics["robust/clean_acc"] = clean_accuracy(model, dataset, augment, max_images=cap)
        if "occlusion" in kinds:
            metrics["robust/occlusion_acc"] = occlusion_accuracy(model, dataset, augment,
                                                                 float(cfg["occlusion_fraction"]), max_images=cap)
        if "fgsm" in kinds:
            metrics["robust/fgsm_acc"] = fgsm_accuracy(model, dataset, augment, float(cfg["fgsm_epsilon"]),
                                                       max_images=cap)
    if tracker is not None and run_id is not None:
        _log(tracker, run_id, metrics, profile)
    return {"metrics": metrics, "spatial": profile}


def _log(tracker, run_id: str, metrics: Mapping[str, float], profile: Mapping[str, Any] | None) -> None:
    if metrics:
        tracker.log_metrics(run_id, metrics, step=0)
    if profile is None:
        return
    for block in range(len(profile["distance_px"])):
        tracker.log_metrics(run_id, {f"spatial/{key}": profile[key][block]
                                     for key in SPATIAL_METRICS}, step=block)
    figure = spatial_figure({"run": profile})
    import matplotlib.pyplot as plt  # after spatial_figure, which picks the file-only Agg backend

    tracker.log_figure(run_id, figure, "spatial.png")
    plt.close(figure)
    tracker.log_json(run_id, profile, "spatial.json")
