"""The model family: presets (exact params, MACs, grids), timm equivalence, pooling types, config validation."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import Block
from torch import nn

import pitsearch.models as models
from pitsearch.errors import ConfigError
from pitsearch.models import (
    POOL_TYPES,
    TokenPool,
    build_model,
    list_presets,
    register_pool,
    resolve_model_config,
    validate_model_config,
)
from pitsearch.models.timm_import import from_timm, load_timm_state_dict
from pitsearch.profile import model_stats

# preset -> (params, GMACs from pit-facts §5 (fvcore column), grid sides, channels, token strides); 224 px, 1000 cls
PRESET_TABLE = {
    "pit_ti": (4_847_272, 0.702, [27, 14, 7], [64, 128, 256], [8, 16, 32]),
    "pit_xs": (10_618_888, 1.399, [27, 14, 7], [96, 192, 384], [8, 16, 32]),
    "pit_s": (23_461_912, 2.877, [27, 14, 7], [144, 288, 576], [8, 16, 32]),
    "pit_b": (73_764_840, 12.42, [31, 16, 8], [256, 512, 1024], [7, 14, 28]),
    "vit_ti": (5_717_416, 1.258, [14], [192], [16]),
    "vit_s": (22_050_664, 4.608, [14], [384], [16]),
    "vit_b": (86_567_656, 17.58, [14], [768], [16]),
}
MNIST_SHAPE = {"img_size": 28, "in_chans": 1, "num_classes": 10}


def build_on_meta(name_or_cfg, **overrides):
    """Shapes only: the big presets build in milliseconds and count MACs without allocating anything."""
    with torch.device("meta"):
        return build_model(name_or_cfg, **overrides)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_cfg(pool: str) -> dict:
    """Three small stages on a 32 px image: patch 4 / stride 2 gives 15 -> 8 -> 4 with stride-2 pooling."""
    return {"depths": [1, 1, 1], "heads": [1, 2, 4], "head_dims": [8, 8, 8], "patch_size": 4, "stride": 2,
            "pool": pool, "img_size": 32, "in_chans": 3, "num_classes": 10}


# --- presets ----------------------------------------------------------------------------------------------------

def test_list_presets_has_every_yaml():
    assert set(PRESET_TABLE) | {"pit_nano", "vit_nano"} <= set(list_presets())


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_preset_params_macs_grids(name):
    params, gmacs, grids, channels, strides = PRESET_TABLE[name]
    model = build_on_meta(name)
    assert n_params(model) == params
    assert model.grid_sizes == [(g, g) for g in grids]
    assert model.channels == channels
    assert model.token_strides == strides
    stats = model_stats(model, 224)
    assert abs(stats["macs"] / 1e9 - gmacs) / gmacs < 0.01
    assert [s["tokens"] for s in stats["stages"]] == [g * g + 1 for g in grids]


@pytest.mark.parametrize("name, params, grids, strides", [
    ("pit_nano", 330_826, [13, 7, 4], [2, 4, 8]),
    ("vit_nano", 803_210, [7], [4]),
])
def test_small_presets_at_mnist_shape(name, params, grids, strides):
    model = build_on_meta(name, **MNIST_SHAPE)
    assert n_params(model) == params
    assert model.grid_sizes == [(g, g) for g in grids]
    assert model.token_strides == strides


def test_vit_presets_are_one_stage_with_class_position():
    cfg = resolve_model_config("vit_s")
    assert (len(cfg["depths"]), cfg["depths"][0], cfg["patch_size"], cfg["stride"]) == (1, 12, 16, 16)
    assert cfg["pool"] == "none" and cfg["cls_pos_embed"] is True and cfg["head_dims"] == [64]


def test_model_structure_and_attributes():
    model = build_model("pit_ti")
    assert model.num_prefix_tokens == 1
    assert model.stages[0].pool is None
    assert [type(stage.pool).__name__ for stage in model.stages[1:]] == ["ConvPool", "ConvPool"]
    assert all(isinstance(block, Block) for stage in model.stages for block in stage.blocks)
    assert model.pos_embed.shape == (1, 64, 27, 27) and model.cls_token.shape == (1, 1, 64)
    assert model.cls_pos_embed is None
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert build_on_meta("vit_ti").no_weight_decay() == {"pos_embed", "cls_token", "cls_pos_embed"}
    # PiT init: LayerNorm reset, embeddings truncated normal with std 0.02
    assert torch.equal(model.norm.weight, torch.ones(256)) and torch.equal(model.norm.bias, torch.zeros(256))
    assert 0.015 < model.pos_embed.std().item() < 0.025


def test_forward_features_and_head_shapes():
    model = build_model("pit_nano", **MNIST_SHAPE).eval()
    images = torch.randn(2, 1, 28, 28)
    features = model.forward_features(images)
    assert features.shape == (2, 1, 128)
    assert model.forward_head(features, pre_logits=True).shape == (2, 128)
    assert torch.equal(model.forward_head(features), model(images))


def test_drop_path_is_linear_over_all_blocks_like_timm():
    ours = build_on_meta("pit_s", drop_path=0.1)
    reference = timm.create_model("pit_s_224", drop_path_rate=0.1, pretrained=False, device="meta")

    def rates(stages):
        return [getattr(block.drop_path1, "drop_prob", 0.0) for stage in stages for block in stage.blocks]

    assert rates(ours.stages) == pytest.approx(rates(reference.transformers), abs=1e-7)
    assert rates(ours.stages)[0] == 0.0 and rates(ours.stages)[-1] == pytest.approx(0.1)


# --- timm equivalence -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, timm_name", [
    ("pit_ti", "pit_ti_224"),
    ("pit_s", "pit_s_224"),
    ("vit_ti", "deit_tiny_patch16_224"),
])
def test_same_logits_as_timm(preset, timm_name):
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False).eval()
    ours = build_model(preset).eval()
    load_timm_state_dict(ours, reference.state_dict(), timm_name)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max().item() < 1e-5


def test_timm_import_names_the_field_on_mismatch():
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, device="meta").state_dict()
    with pytest.raises(ConfigError, match=r"^model\.cls_pos_embed: "):
        load_timm_state_dict(build_on_meta("vit_ti", cls_pos_embed=False), deit, "deit_tiny")
    pit_ti = timm.create_model("pit_ti_224", pretrained=False, device="meta").state_dict()
    with pytest.raises(ConfigError, match=r"^model\.img_size: .*pos_embed"):
        load_timm_state_dict(build_on_meta("pit_ti", img_size=256), pit_ti, "pit_ti_224")
    with pytest.raises(ConfigError, match=r"^model: .*does not match"):
        load_timm_state_dict(build_on_meta("pit_b"), pit_ti, "pit_ti_224")


def test_from_timm_keeps_a_fresh_head_for_other_label_sets():
    model = from_timm("pit_ti", pretrained=False, num_classes=10)
    assert model.head.out_features == 10
    with pytest.raises(ConfigError, match=r"^model\.timm_name: "):
        from_timm("pit_nano", pretrained=False)


def test_pretrained_fetch_failure_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError) as caught:
        build_model("pit_ti", pretrained=True)
    message = str(caught.value)
    assert message.startswith("model.pretrained: could not fetch") and "\n" not in message


# --- pooling types ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", sorted(POOL_TYPES))
def test_every_pool_type_trains_on_32px(pool):
    model = build_model(small_cfg(pool))
    expected_grids = [(15, 15)] * 3 if pool == "none" else [(15, 15), (8, 8), (4, 4)]
    assert model.grid_sizes == expected_grids
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).mean()
    loss.backward()
    pool_grads = [p.grad for stage in model.stages[1:] for p in stage.pool.parameters()]
    assert pool_grads and all(g is not None and g.abs().sum() > 0 for g in pool_grads)
    assert model.patch_embed.conv.weight.grad.abs().sum() > 0


def test_conv_pool_is_pits_depthwise_conv():
    pool = build_model("pit_s").stages[1].pool
    conv = pool.conv
    assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((3, 3), (2, 2), (1, 1), 144)
    assert conv.weight.shape == (288, 1, 3, 3) and conv.bias is not None
    assert (pool.fc.in_features, pool.fc.out_features) == (144, 288)


def test_avg_pool_ignores_padding_and_max_avg_project_channels():
    avg = POOL_TYPES["avg"](4, 8)
    pooled = avg.pool(torch.ones(1, 4, 5, 5))
    assert pooled.shape == (1, 4, 3, 3) and torch.allclose(pooled, torch.ones_like(pooled))
    x, cls = POOL_TYPES["max"](4, 8)(torch.randn(2, 4, 7, 7), torch.randn(2, 1, 4))
    assert x.shape == (2, 8, 4, 4) and cls.shape == (2, 1, 8)


def test_none_pool_projects_only_when_channels_change():
    same = POOL_TYPES["none"](8, 8)
    assert isinstance(same.proj, nn.Identity) and isinstance(same.fc, nn.Identity)
    x, cls = POOL_TYPES["none"](8, 16)(torch.randn(2, 8, 5, 5), torch.randn(2, 1, 8))
    assert x.shape == (2, 16, 5, 5) and cls.shape == (2, 1, 16)


@pytest.fixture
def extra_pool_type():
    @register_pool("test_stride1_conv")
    class Stride1Conv(TokenPool):
        def __init__(self, in_channels, out_channels):
            super().__init__(in_channels, out_channels)
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.fc = nn.Linear(in_channels, out_channels)

        def forward(self, x, cls_tokens):
            return self.conv(x), self.fc(cls_tokens)

    yield "test_stride1_conv"
    del POOL_TYPES["test_stride1_conv"]


def test_a_new_pool_type_is_one_class_and_one_registration(extra_pool_type):
    model = build_model(small_cfg(extra_pool_type))
    assert model.grid_sizes == [(15, 15)] * 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="already registered"):
        register_pool(extra_pool_type)(TokenPool)


# --- config resolution and validation ---------------------------------------------------------------------------

def test_resolve_accepts_name_dict_dictconfig_and_overrides_win():
    from_name = resolve_model_config("pit_s")
    assert (from_name["img_size"], from_name["in_chans"], from_name["num_classes"]) == (224, 3, 1000)
    from_dictconfig = resolve_model_config(OmegaConf.create(from_name), num_classes=10)
    assert from_dictconfig["num_classes"] == 10 and from_dictconfig["depths"] == [2, 6, 4]
    from_dict = resolve_model_config({"depths": (1,), "heads": [2], "head_dims": [8], "patch_size": 4,
                                      "stride": 4, "pool": "none", "img_size": 16})
    assert from_dict["depths"] == [1] and from_dict["mlp_ratio"] == 4.0 and from_dict["name"] is None


@pytest.mark.parametrize("overrides, field", [
    ({"heads": [2, 4]}, "model.heads"),
    ({"head_dims": [32, 32, 32, 32]}, "model.head_dims"),
    ({"depths": [2, 0, 4]}, "model.depths"),
    ({"depths": []}, "model.depths"),
    ({"heads": [2, -4, 8]}, "model.heads"),
    ({"head_dims": [32, 0, 32]}, "model.head_dims"),
    ({"patch_size": 0}, "model.patch_size"),
    ({"stride": -1}, "model.stride"),
    ({"img_size": 0}, "model.img_size"),
    ({"in_chans": 0}, "model.in_chans"),
    ({"num_classes": 0}, "model.num_classes"),
    ({"mlp_ratio": 0}, "model.mlp_ratio"),
    ({"drop_path": 1.0}, "model.drop_path"),
    ({"drop_path": -0.1}, "model.drop_path"),
    ({"drop_rate": 1.5}, "model.drop_rate"),
    ({"pool": "maxx"}, "model.pool"),
    ({"img_size": 32}, "model.depths"),  # 3 -> 2 -> 1: the second pooling step gets a 2x2 grid
    ({"patch_size": 300, "img_size": 224}, "model.patch_size"),
    ({"heads": [2, 3, 8]}, "model.pool"),  # conv pooling from 64 to 96 channels is not depthwise
    ({"dept": [1]}, "model.dept"),
    ({"pretrained": True, "timm_name": None}, "model.pretrained"),
    ({"cls_pos_embed": "yes"}, "model.cls_pos_embed"),
])
def test_validation_names_the_field_in_one_line(overrides, field):
    with pytest.raises(ConfigError) as caught:
        validate_model_config({**resolve_model_config("pit_ti"), **overrides})
    message = str(caught.value)
    assert message.startswith(f"{field}: ") and "\n" not in message
    assert caught.value.field == field


def test_unknown_pool_lists_valid_types_and_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"valid: avg, conv, max, none"):
        resolve_model_config("pit_ti", pool="maxx")
    with pytest.raises(ConfigError, match=r"^model: unknown preset 'pit_xxl'; presets: .*pit_s"):
        build_model("pit_xxl")


def test_grid_rule_a_pooling_step_needs_a_3x3_input():
    # 24 px, patch 16 / stride 4: 3x3 -> 2x2 is fine, a further step from 2x2 is not.
    base = {"img_size": 24, "patch_size": 16, "stride": 4}
    two_stages = resolve_model_config("pit_ti", depths=[1, 1], heads=[2, 4], head_dims=[32, 32], **base)
    assert build_on_meta(two_stages).grid_sizes == [(3, 3), (2, 2)]
    with pytest.raises(ConfigError, match=r"^model\.depths: .*3x3 -> 2x2 -> 1x1"):
        resolve_model_config("pit_ti", **base)
    assert resolve_model_config("pit_ti", pool="none", heads=[2, 2, 2], **base)["pool"] == "none"


def test_validation_runs_before_anything_is_built(monkeypatch):
    def must_not_build(**kwargs):
        raise AssertionError("built before validation")

    monkeypatch.setattr(models, "PoolingViT", must_not_build)
    with pytest.raises(ConfigError, match=r"^model\.heads: "):
        build_model("pit_s", heads=[3, 6])
