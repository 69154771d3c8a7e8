"""Profiling: counted MACs include attention, equal the closed form, leave the model untouched; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from pitsearch.models import build_model, list_presets
from pitsearch.profile import closed_form_macs, closed_form_params, main, model_stats

SMALL_CFG = {"depths": [1, 1, 1], "heads": [1, 2, 4], "head_dims": [8, 8, 8], "patch_size": 4, "stride": 2,
             "img_size": 32, "in_chans": 3, "num_classes": 10}


def test_model_stats_on_a_real_model_counts_attention_and_restores_state():
    model = build_model("pit_ti").train()
    model.cls_token.requires_grad_(False)  # a frozen parameter must stay frozen, the others trainable
    attention = model.stages[0].blocks[0].attn
    assert getattr(attention, "fused_attn", True)  # fused SDPA is what FlopCounterMode would miss on CPU

    stats = model_stats(model, 224)

    assert stats["params"] == 4_847_272
    assert stats["macs"] == closed_form_macs("pit_ti")  # the closed form includes 2*N^2*C per block
    assert [s["grid"] for s in stats["stages"]] == ["27x27", "14x14", "7x7"]
    assert stats["stages"][1] == {"stage": 1, "pool": "conv", "grid": "14x14", "tokens": 197, "channels": 128,
                                  "depth": 6, "heads": 4, "head_dim": 32, "token_stride": 16}
    assert model.training
    assert not model.cls_token.requires_grad and model.pos_embed.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "cls_token")


def test_meta_device_count_equals_real_count():
    real = model_stats(build_model("vit_nano", img_size=28, in_chans=1, num_classes=10))
    with torch.device("meta"):
        meta_model = build_model("vit_nano", img_size=28, in_chans=1, num_classes=10)
    assert model_stats(meta_model) == real


def test_model_stats_rejects_another_image_size():
    with pytest.raises(ValueError, match="built for 28 px"):
        model_stats(build_model("vit_nano", img_size=28), 32)


@pytest.mark.parametrize("name", list_presets())
def test_closed_form_equals_counted_for_presets(name):
    shape = {"img_size": 28, "in_chans": 1, "num_classes": 10} if "nano" in name else {}
    with torch.device("meta"):
        model = build_model(name, **shape)
    stats = model_stats(model)
    assert stats["macs"] == closed_form_macs(model.model_config)
    assert stats["params"] == closed_form_params(model.model_config)


@pytest.mark.parametrize("pool", ["conv", "max", "avg", "none"])
def test_closed_form_equals_counted_for_pool_types(pool):
    cfg = {**SMALL_CFG, "pool": pool}
    stats = model_stats(build_model(cfg))
    assert (stats["macs"], stats["params"]) == (closed_form_macs(cfg), closed_form_params(cfg))


def test_closed_form_for_none_pool_with_equal_channels_and_odd_mlp_ratio():
    cfg = {**SMALL_CFG, "pool": "none", "heads": [2, 2, 4], "mlp_ratio": 2.5, "cls_pos_embed": True}
    stats = model_stats(build_model(cfg))
    assert (stats["macs"], stats["params"]) == (closed_form_macs(cfg), closed_form_params(cfg))


# --- command line -----------------------------------------------------------------------------------------------

def test_cli_prints_pit_b_params(capsys):
    assert main(["model=pit_b"]) == 0
    out = capsys.readouterr().out
    assert "73,764,840" in out and "12.402 G" in out and "31x31" in out and "8x8" in out


def test_cli_json_with_overrides(capsys):
    assert main(["model=pit_nano", "model.img_size=28", "model.in_chans=1", "model.num_classes=10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 330_826
    assert [s["grid"] for s in report["stages"]] == ["13x13", "7x7", "4x4"]
    assert report["model"]["img_size"] == 28 and report["macs"] == closed_form_macs(report["model"])


def test_cli_list_override(capsys):
    assert main(["model=pit_ti", "model.depths=[1,1,1]", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["depths"] == [1, 1, 1]


@pytest.mark.parametrize("argv, start", [
    (["model=pit_s", "model.heads=[3,6]"], "error: model.heads: "),
    (["model=pit_s", "model.img_size=32"], "error: model.depths: "),
    (["model=nope"], "error: model: unknown preset"),
    (["model=pit_s", "data.img_size=32"], "error: unknown argument"),
    (["model=pit_s", "--bogus"], "error: unrecognized arguments"),
    ([], "error: model=NAME is required"),
    (["model=pit_s", "model.depths=[1,2"], "error: cannot parse overrides"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, start):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(start) and captured.err.count("\n") == 1 and captured.out == ""
