"""Packed trials (pitsearch/packed.py): K members trained as one stacked model equal K `train_model` runs."""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import pytest
import torch

from conftest import TINY
from pitsearch.packed import pack_key, pack_size, train_packed
from pitsearch.packed_model import PackedModel
from pitsearch.runstate import Diverged, StopRun
from pitsearch.train import TrainResult, train_model

# Members differ in seed, lr and weight decay, as trials of one sweep cell do.
MEMBERS = [["train.seed=0"],
           ["train.seed=1", "train.lr=1e-3", "train.weight_decay=0.0"],
           ["train.seed=2", "train.lr=4e-3", "train.weight_decay=0.2"]]
# Losses agree to float32 rounding (measured: train losses bit-equal, val losses within 4e-7);
# accuracies are counts, so equal.
LOSS_TOL = 1e-5
ACC_TOL = 1e-4


class Member(NamedTuple):
    cfg: dict
    model: torch.nn.Module
    dataset: object


def _prepare_members(compose, extra, members=MEMBERS):
    """Each member's config, model and the shared dataset, built as experiment.prepare builds them: the model
    under torch.manual_seed(train.seed)."""
    from pitsearch.data import load_dataset
    from pitsearch.experiment import fill_model_from_data
    from pitsearch.models import build_model, resolve_model_config

    cfgs = [compose(TINY + ["train.device=cpu", *extra, *member]) for member in members]
    dataset = load_dataset(cfgs[0]["data"])
    prepared = []
    for cfg in cfgs:
        cfg["model"] = resolve_model_config(fill_model_from_data(cfg["model"], dataset))
        torch.manual_seed(cfg["train"]["seed"])
        prepared.append(Member(cfg, build_model(cfg["model"]), dataset))
    return prepared


def _unpacked(prepared, callbacks=()):
    """train_model on a copy of the member's model; (TrainResult, exception or None, trained model)."""
    model, result = copy.deepcopy(prepared.model), TrainResult()
    try:
        train_model(model, prepared.dataset, prepared.cfg["train"], prepared.cfg["data"].get("aug"),
                    callbacks=callbacks, result=result)
    except StopRun as stop:
        return result, stop, model
    return result, None, model


def _assert_same_curves(packed: TrainResult, unpacked: TrainResult) -> None:
    assert packed.epochs_run == unpacked.epochs_run
    for key in ("train/loss", "val/loss"):
        assert packed.history[key] == pytest.approx(unpacked.history[key], rel=LOSS_TOL, nan_ok=True), key
    for key in ("train/acc", "val/acc", "val/acc_best", "gen/gap"):
        assert packed.history[key] == pytest.approx(unpacked.history[key], abs=ACC_TOL), key
    assert packed.history["lr"] == pytest.approx(unpacked.history["lr"], rel=1e-12)


@pytest.mark.parametrize("extra", [[], ["model.drop_path=0.2", "model.drop_rate=0.1", "data.aug.mixup=0.4",
                                        "data.aug.cutmix=0.5"]], ids=["plain", "dropout-droppath-mixup"])
def test_packed_members_equal_unpacked_runs_member_by_member(compose, extra):
    members = _prepare_members(compose, ["train.epochs=2", *extra])
    expected = [_unpacked(member) for member in members]
    outcomes = train_packed([m.model for m in members], members[0].dataset, [m.cfg["train"] for m in members],
                            members[0].cfg["data"].get("aug"))
    for outcome, (result, error, model), member in zip(outcomes, expected, members):
        assert error is None and isinstance(outcome, TrainResult)
        _assert_same_curves(outcome, result)
        for (name, packed_param), unpacked_param in zip(member.model.named_parameters(), model.parameters()):
            if name.endswith("qkv.bias"):
                # The key bias has zero gradient (softmax ignores a constant per query); AdamW scales float
                # noise in it to lr-sized steps that differ between any two implementations. Leave it out.
                keep = torch.ones_like(packed_param, dtype=torch.bool)
                keep[len(keep) // 3: 2 * len(keep) // 3] = False
                packed_param, unpacked_param = packed_param[keep], unpacked_param[keep]
            torch.testing.assert_close(packed_param, unpacked_param, rtol=1e-5, atol=1e-6, msg=name)
        images = member.dataset.val_x[:100].float()
        torch.testing.assert_close(member.model(images), model(images), rtol=1e-5, atol=1e-5)
    # Different seeds, learning rates and weight decays really trained differently.
    assert len({round(o.history["train/loss"][-1], 6) for o in outcomes}) == 3


def test_pruned_diverged_and_failing_members_leave_the_others_unchanged(compose):
    members = _prepare_members(compose, ["train.epochs=3"], MEMBERS + [["train.seed=3", "train.lr=1e30"],
                                                                     ["train.seed=4"]])

    def prune_at_epoch_1(epoch, metrics):
        if epoch == 1:
            raise StopRun("pruned at epoch 1")

    def broken(epoch, metrics):
        raise ValueError("tracker down")

    callbacks = [[], [prune_at_epoch_1], [], [], [broken]]
    expected = [_unpacked(member, cbs) for member, cbs in zip(members[:4], callbacks)]
    results = [TrainResult() for _ in members]
    outcomes = train_packed([m.model for m in members], members[0].dataset, [m.cfg["train"] for m in members],
                            members[0].cfg["data"].get("aug"), callbacks=callbacks, results=results)

    assert isinstance(outcomes[0], TrainResult) and isinstance(outcomes[2], TrainResult)
    assert type(outcomes[1]) is StopRun and outcomes[1].reason == "pruned at epoch 1"
    assert isinstance(outcomes[3], Diverged) and isinstance(expected[3][1], Diverged)
    assert isinstance(outcomes[4], ValueError) and results[4].epochs_run == 1  # a failure fails only its member
    assert results[1].epochs_run == 2
    for result, (unpacked, _, _) in zip(results[:4], expected):
        _assert_same_curves(result, unpacked)  # the pruned and diverged members' curves up to their stop too


def test_packed_forward_folds_attention_and_matches_each_member_for_every_pool_type():
    from pitsearch.models import build_model

    for pool in ("conv", "max", "avg", "none"):
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(build_model("pit_nano", pool=pool, depths=[1, 1, 1], heads=[1, 2, 4],
                                      head_dims=[8, 8, 8], patch_size=2, stride=1, img_size=8, in_chans=1,
                                      num_classes=10))
        packed = PackedModel(models, seeds=[0, 1, 2])
        x = torch.randn(3, 16, 1, 8, 8)
        with warnings.catch_warnings():
            # vmap warns "performance drop ... batching rule" when it loops over members instead (CPU flash SDPA).
            warnings.simplefilter("error")
            logits = packed(x)
        for member, model in enumerate(models):
            torch.testing.assert_close(logits[member], model(x[member]), rtol=1e-5, atol=1e-6)


def test_pack_key_names_what_members_may_not_differ_in(compose):
    base = compose(TINY)
    same = [compose(TINY + ["train.seed=3", "train.lr=1e-4", "train.weight_decay=0"]), base]
    assert {pack_key(cfg) for cfg in same} == {pack_key(base)} and pack_key(base) is not None
    assert pack_key(compose(TINY + ["train.batch_size=64"])) != pack_key(base)
    assert pack_key(compose(TINY + ["model.pool=max"])) != pack_key(base)
    assert pack_key(compose(TINY + ["train.opt=sgd"])) is None
    assert pack_key(compose(TINY + ["train.compile=true"])) is None
    assert pack_key(compose(TINY + ["train.cuda_graph=on"])) is None   # one model's step is captured, not a pack's
    with pytest.raises(ValueError, match="differ in train.batch_size"):  # before any model or data is touched
        train_packed([None, None], None, [base["train"], compose(TINY + ["train.batch_size=64"])["train"]], None)


def test_pack_size_off_auto_and_explicit_caps(compose):
    cfg = compose(TINY)
    from pitsearch.experiment import fill_model_from_data
    from pitsearch.data import load_dataset
    from pitsearch.models import resolve_model_config

    model_cfg = resolve_model_config(fill_model_from_data(cfg["model"], load_dataset(cfg["data"])))
    plenty = 1 << 40
    assert pack_size(model_cfg, cfg["train"], "cpu", "off", plenty) == 1
    assert pack_size(model_cfg, cfg["train"], "cpu", "auto", plenty) == 1       # auto packs on CUDA only
    assert pack_size(model_cfg, cfg["train"], "cuda", "auto", plenty) == 8
    assert pack_size(model_cfg, cfg["train"], "cpu", 3, plenty) == 3            # N packs on any device
    assert pack_size(model_cfg, cfg["train"], "cpu", 3, 1000) == 1              # memory bounds N
    with pytest.raises(ValueError, match="sweep.pack"):
        pack_size(model_cfg, cfg["train"], "cpu", "many", plenty)


# ----------------------------------------------------------------------------------------- GPU (skipped without)

@pytest.mark.gpu
def test_packed_training_on_cuda_reaches_the_accuracy_of_unpacked_runs_on_mnist5k(compose):
    """pit_nano on mnist5k (the default run), 3 seeds, bf16 autocast: each packed member ends where its own run
    does (kernels and reduction orders differ on a GPU, so accuracies are compared, not bits)."""
    from pitsearch.experiment import prepare

    runs = [prepare(compose([f"train.seed={seed}", "train.epochs=3", "train.device=cuda", "train.progress=false"]))
            for seed in (0, 1, 2)]
    alone = [_unpacked(Member(p.cfg, p.model, p.dataset))[0] for p in runs]
    packed = train_packed([p.model for p in runs], runs[0].dataset, [p.cfg["train"] for p in runs],
                          runs[0].cfg["data"].get("aug"))
    for member, reference in zip(packed, alone):
        assert isinstance(member, TrainResult)
        assert abs(member.final["val/acc"] - reference.final["val/acc"]) <= 0.02
        assert member.final["val/acc"] > 0.5   # it learned (chance is 0.1)
