"""Post-training analyses: spatial-interaction statistics, attention capture, robustness, logging, config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import TINY
from pitsearch.analysis import (
    capture_attention,
    clean_accuracy,
    fgsm_accuracy,
    load_eval_defaults,
    occlusion_accuracy,
    resolve_eval_config,
    run_analyses,
    spatial_profile,
    validate_eval_config,
)
from pitsearch.analysis.robustness import occlude_center
from pitsearch.analysis.spatial import (
    attention_distance_px,
    attention_entropy,
    block_layout,
    block_statistics,
    interaction_ratio,
)
from pitsearch.augment import BatchAugment
from pitsearch.errors import ConfigError


def uniform_map(grid, heads=2, prefix=1, over_prefix=False):
    """Every query (class token included) attends evenly to all spatial keys (and the class token if asked)."""
    spatial = grid[0] * grid[1]
    n = prefix + spatial
    attn = torch.zeros(1, heads, n, n)
    if over_prefix:
        attn[:] = 1 / n
    else:
        attn[..., prefix:] = 1 / spatial
    return attn


def identity_map(grid, heads=2, prefix=1):
    n = prefix + grid[0] * grid[1]
    return torch.eye(n).expand(1, heads, n, n).clone()


# --- statistics on hand-made maps ----------------------------------------------------------------------------

def test_uniform_attention_on_a_2x2_grid_matches_hand_computed_values():
    attn = uniform_map((2, 2))  # each weight 1/4; distances from any corner: 0, s, s, s*sqrt(2)
    stride = 4
    assert attention_distance_px(attn, (2, 2), stride) == pytest.approx((0 + 4 + 4 + 4 * math.sqrt(2)) / 4)
    assert attention_entropy(attn) == pytest.approx(math.log(4))
    assert interaction_ratio(attn, threshold=0.1) == 1.0   # 0.25 > 0.1 everywhere
    assert interaction_ratio(attn, threshold=0.3) == 0.0


def test_class_token_is_excluded_and_spatial_weights_renormalised():
    attn = uniform_map((2, 2), over_prefix=True)  # 1/5 on the class token and on each spatial key
    # distance and entropy renormalise the four spatial weights to 1/4: same as without the class token
    assert attention_distance_px(attn, (2, 2), 4) == pytest.approx(2 + math.sqrt(2))
    assert attention_entropy(attn) == pytest.approx(math.log(4))
    # the ratio counts raw values: 0.2 is above 0.1 but below 0.25
    assert interaction_ratio(attn, threshold=0.1) == 1.0
    assert interaction_ratio(attn, threshold=0.25) == 0.0
    # a map whose class-token row looks far away must not move anything
    attn[:, :, 0, 1:] = 0
    attn[:, :, 0, -1] = 1
    assert attention_distance_px(attn, (2, 2), 4) == pytest.approx(2 + math.sqrt(2))


def test_non_square_grid_uses_rows_and_columns_times_stride():
    attn = uniform_map((1, 3), prefix=0)  # three tokens in a row, 2 px apart
    # from each query: (0 + 2 + 4) / 3, (2 + 0 + 2) / 3, (4 + 2 + 0) / 3 -> mean 16 / 9
    assert attention_distance_px(attn, (1, 3), 2, num_prefix_tokens=0) == pytest.approx(16 / 9)
    assert attention_entropy(attn, num_prefix_tokens=0) == pytest.approx(math.log(3))


def test_identity_attention_has_zero_distance_and_entropy():
    attn = identity_map((3, 3))
    stats = block_statistics(attn, (3, 3), 8, num_prefix_tokens=1, threshold=0.1)
    assert stats["distance_px"] == 0.0
    assert stats["entropy"] == 0.0
    assert stats["interaction_ratio"] == pytest.approx(1 / 9)  # one entry per query row of nine


def test_statistics_average_over_heads():
    attn = torch.cat([uniform_map((2, 2), heads=1), identity_map((2, 2), heads=1)], dim=1)
    assert attention_distance_px(attn, (2, 2), 4) == pytest.approx((2 + math.sqrt(2)) / 2)
    assert attention_entropy(attn) == pytest.approx(math.log(4) / 2)
    assert interaction_ratio(attn, threshold=0.1) == pytest.approx((1 + 1 / 4) / 2)


def test_grid_that_does_not_match_the_map_is_rejected():
    with pytest.raises(ValueError, match="grid"):
        attention_distance_px(uniform_map((2, 2)), (3, 3), 4)


# --- capturing the maps from a model --------------------------------------------------------------------------

def tiny_model():
    from pitsearch.models import build_model

    torch.manual_seed(0)
    return build_model("pit_nano", img_size=8, in_chans=1, num_classes=10, patch_size=2, stride=1,
                       depths=[1, 2, 1], heads=[1, 2, 4], head_dims=[8, 8, 8]).eval()


def test_captured_maps_equal_a_manual_softmax_and_the_capture_cleans_up():
    model = tiny_model()
    attentions = [entry["attn"] for entry in block_layout(model)]
    flags = [True, False, True, True]
    for module, flag in zip(attentions, flags):
        module.fused_attn = flag
    inputs = {}
    pre_hooks = [module.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
                 for i, module in enumerate(attentions)]
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        fused_logits = model(images)
        with capture_attention(model) as maps:
            logits = model(images)
    for hook in pre_hooks:
        hook.remove()

    torch.testing.assert_close(logits, fused_logits, rtol=1e-5, atol=1e-5)  # same maths, other kernel
    for i, module in enumerate(attentions):
        x = inputs[i]
        batch, tokens, _ = x.shape
        q, k, _ = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        manual = ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
        assert maps[i].shape == (3, module.num_heads, tokens, tokens)
        torch.testing.assert_close(maps[i], manual, rtol=0, atol=1e-7)
    assert [module.fused_attn for module in attentions] == flags
    assert all(not module.attn_drop._forward_hooks for module in attentions)


def test_capture_restores_the_model_after_an_error():
    model = tiny_model()
    attentions = [entry["attn"] for entry in block_layout(model)]
    flags = [module.fused_attn for module in attentions]
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model):
        raise RuntimeError("boom")
    assert [module.fused_attn for module in attentions] == flags
    assert all(not module.attn_drop._forward_hooks for module in attentions)


def test_profile_has_one_entry_per_block_and_chunks_do_not_change_it():
    model = tiny_model().train()
    images = torch.randn(8, 1, 8, 8)
    profile = spatial_profile(model, images, threshold=0.1, batch_size=3)
    assert model.training  # mode restored
    assert profile["stage_of_block"] == [0, 1, 1, 2]
    assert profile["stage_boundaries"] == [1, 3]
    model.eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(images)
    for i, entry in enumerate(block_layout(model)):
        whole = block_statistics(maps[i], entry["grid"], entry["token_stride"], 1, 0.1)
        for key, value in whole.items():
            assert profile[key][i] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, i)
    # a pooled stage's tokens sit further apart: stride 1 -> 2 -> 4 px here
    assert [entry["token_stride"] for entry in block_layout(model)] == [1, 2, 2, 4]


# --- robustness on a briefly trained model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """A tiny PiT trained 3 epochs on sklearn digits (8x8): (model, dataset, augment)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pitsearch.experiment import prepare, run_experiment
    from pitsearch.paths import CONF_DIR

    # small batches, lr 3e-3, no warmup: 41-65% val accuracy over seeds 0-3 in 3 short epochs, enough for the
    # perturbations to have something to break
    overrides = TINY + ["train.epochs=3", "train.batch_size=64", "train.warmup_epochs=0", "train.lr=3e-3",
                        "train.device=cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides), resolve=True)
    prepared = prepare(cfg)
    assert run_experiment(cfg, prepared=prepared).state == "COMPLETE"
    dataset = prepared.dataset
    return prepared.model, dataset, BatchAugment(None, dataset, dataset.num_classes)


def test_zero_perturbations_give_clean_accuracy_exactly(trained):
    from pitsearch.train import evaluate

    model, dataset, augment = trained
    clean = clean_accuracy(model, dataset, augment, max_images=None)
    _, val_acc = evaluate(model, dataset.val_x, dataset.val_y, augment, 250, torch.device("cpu"))
    assert clean == val_acc
    assert clean > 0.3  # training learnt something, so FGSM has something to break
    assert occlusion_accuracy(model, dataset, augment, 0.0, max_images=None) == clean
    assert fgsm_accuracy(model, dataset, augment, 0.0, max_images=None) == clean


def test_fgsm_accuracy_does_not_increase_with_epsilon_and_leaves_the_model_alone(trained):
    model, dataset, augment = trained
    model.train()
    model.zero_grad(set_to_none=True)  # training's last step left gradients behind
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accuracies = [fgsm_accuracy(model, dataset, augment, eps, max_images=200) for eps in (0, 4, 16, 64)]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] < accuracies[0]
    assert model.training  # mode restored
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.eval()


def test_occlusion_blacks_out_a_centered_square_in_pixel_space(trained):
    _, dataset, augment = trained
    images = torch.full((2, 1, 10, 10), 200, dtype=torch.uint8)
    occluded = occlude_center(images, 0.25)  # 25 of 100 pixels: a 5x5 square at rows/cols 2..6
    assert (occluded == 0).sum().item() == 2 * 25
    assert (occluded[..., 2:7, 2:7] == 0).all() and images.min() == 200  # the input is not modified
    normalised = augment.eval(occluded)
    # black before normalisation, i.e. -mean/std after it, not 0
    assert normalised[0, 0, 4, 4].item() == pytest.approx(-dataset.mean[0] / dataset.std[0], rel=1e-5)
    assert torch.equal(occlude_center(images, 0.0), images)
    with pytest.raises(ValueError):
        occlude_center(images, 1.0)


# --- run_analyses and MLflow ------------------------------------------------------------------------------------

def test_run_analyses_logs_per_block_metrics_figure_and_json(trained, tmp_path):
    from pitsearch.tracking import Tracker

    model, dataset, _ = trained
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")
    run_id = tracker.start_run(run_name="analysis")
    result = run_analyses(model, dataset, {"spatial": True, "spatial_images": 16, "robustness": ["occlusion", "fgsm"],
                                           "robustness_images": 100}, tracker=tracker, run_id=run_id)
    tracker.end_run(run_id)
    json.dumps(result)  # fits Optuna user attributes
    metrics = result["metrics"]
    assert {"robust/clean_acc", "robust/occlusion_acc", "robust/fgsm_acc", "spatial/mean_interaction_ratio",
            "spatial/mean_distance_px", "spatial/mean_entropy"} <= set(metrics)
    depth = sum(model.depths)
    for key in ("interaction_ratio", "distance_px", "entropy"):
        history = tracker.metric_history(run_id, f"spatial/{key}")
        assert [step for step, _ in sorted(history)] == list(range(depth))
        assert [value for _, value in sorted(history)] == pytest.approx(result["spatial"][key])
    for key, value in metrics.items():
        assert tracker.metric_history(run_id, key) == [(0, pytest.approx(value))]
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert {"spatial.png", "spatial.json"} <= artifacts


def test_defaults_run_nothing(trained):
    model, dataset, _ = trained
    assert run_analyses(model, dataset, None) == {"metrics": {}, "spatial": None}


# --- config ---------------------------------------------------------------------------------------------------

def test_default_config_is_valid_and_off():
    defaults = load_eval_defaults()
    validate_eval_config(defaults)
    assert defaults["spatial"] is False and defaults["robustness"] == []
    assert resolve_eval_config({"spatial": True})["spatial_images"] == 64


@pytest.mark.parametrize("override, field, fragment", [
    ({"robustness": ["occlusion", "blur"]}, "eval.robustness", "valid: occlusion, fgsm"),
    ({"robustness": "fgsm"}, "eval.robustness", "must be a list"),
    ({"occlusion_fraction": 1.0}, "eval.occlusion_fraction", "[0, 1)"),
    ({"occlusion_fraction": -0.1}, "eval.occlusion_fraction", "[0, 1)"),
    ({"fgsm_epsilon": -1}, "eval.fgsm_epsilon", ">= 0"),
    ({"spatial_threshold": 0}, "eval.spatial_threshold", "(0, 1)"),
    ({"spatial_threshold": 1.5}, "eval.spatial_threshold", "(0, 1)"),
    ({"spatial_images": 0}, "eval.spatial_images", ">= 1"),
    ({"robustness_images": 2.5}, "eval.robustness_images", ">= 1"),
    ({"spatial": "yes"}, "eval.spatial", "true or false"),
    ({"spatail": True}, "eval.spatail", "unknown key"),
])
def test_bad_eval_config_names_the_field_in_one_line(override, field, fragment):
    with pytest.raises(ConfigError) as error:
        validate_eval_config(override)
    assert error.value.field == field
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_pit_vs_vit_sweep_composes_both_variants_at_comparable_macs(compose, tmp_path):
    from pitsearch.profile import closed_form_macs
    from pitsearch.search.compose import TrialComposer
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    cfg = compose(["+sweep=pit_vs_vit"])
    spec = parse_sweep(cfg["sweep"], known_paths=config_paths(cfg), base_dir=tmp_path)
    assert spec.n_trials == 6
    composer = TrialComposer(overrides=["+sweep=pit_vs_vit"])
    macs = {}
    for overrides in spec.space.example_overrides():
        trial = composer.compose(overrides)
        assert trial["eval"]["spatial"] is True and trial["eval"]["robustness"] == ["occlusion", "fgsm"]
        validate_eval_config(trial["eval"])
        model_cfg = {**trial["model"], "img_size": 28, "in_chans": 1, "num_classes": 10}
        if not spec.match.is_reference(model_cfg):   # vit_nano is re-sized to pit_nano's MACs (sweep.match)
            model_cfg = spec.match.solve(model_cfg).cfg
        macs[trial["model"]["name"]] = closed_form_macs(model_cfg)
    assert set(macs) == {"pit_nano", "vit_nano"}
    assert 0.95 <= macs["vit_nano"] / macs["pit_nano"] <= 1.05
