"""CUDA-graphed steps (`train.cuda_graph`, pitsearch/graphs.py): off by default; refused, or left for eager steps,
where a graph cannot replay the step; on the CPU, the graphed loop's buffers and tensors (run eagerly) train as
the plain loop does; on CUDA (gpu marker), captured training matches eager training and repeats itself."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import TINY, run_cli
from pitsearch import graphs
from pitsearch.config import schema as schemas
from pitsearch.errors import ConfigError
from pitsearch.experiment import prepare
from pitsearch.train import train_model, validate_train_config

CUDA = torch.device("cuda")   # only a device object here: nothing runs on it
CLEAN = {"opt": "adamw", "compile": False, "cuda_graph": "on"}


def test_the_switch_is_in_the_schema_and_off_by_default():
    field = next(f for f in schemas.dataclasses.fields(schemas.TrainConfig) if f.name == "cuda_graph")
    assert field.default == "off" and field.metadata["choices"] == ("off", "on", "auto")
    assert validate_train_config({})["cuda_graph"] == "off"


@pytest.mark.parametrize("train, aug, device, words", [
    ({}, None, torch.device("cpu"), "this run trains on cpu"),
    ({"opt": "sgd"}, None, CUDA, "train.opt is 'sgd'"),
    ({"opt": "lamb"}, None, CUDA, "train.opt is 'lamb'"),
    ({"compile": True}, None, CUDA, "train.compile is on"),
    ({}, {"mixup": 0.8}, CUDA, "aug.mixup / aug.cutmix"),
    ({}, {"cutmix": 1.0}, CUDA, "aug.mixup / aug.cutmix"),
])
def test_each_thing_a_graph_cannot_replay_is_named(train, aug, device, words):
    assert words in graphs.capture_problem({**CLEAN, **train}, aug, device)


def test_a_capturable_cuda_config_has_no_problem():
    assert graphs.capture_problem(CLEAN, None, CUDA) is None
    assert graphs.capture_problem({**CLEAN, "opt": "Adam"}, {"crop_padding": 2, "hflip": True, "mixup": 0.0}, CUDA) \
        is None


def test_on_refuses_auto_falls_back_and_logs_its_reason_once(monkeypatch, caplog):
    monkeypatch.setattr(graphs, "_logged", set())
    assert graphs.use_cuda_graphs({**CLEAN, "cuda_graph": "off"}, None, CUDA) is False
    assert graphs.use_cuda_graphs(CLEAN, None, CUDA) is True
    with pytest.raises(ConfigError) as raised:
        graphs.use_cuda_graphs(CLEAN, {"mixup": 0.2}, CUDA)
    assert raised.value.field == "train.cuda_graph" and "aug.mixup" in str(raised.value)
    with caplog.at_level(logging.WARNING, logger="pitsearch.graphs"):
        for _ in range(2):
            assert graphs.use_cuda_graphs({**CLEAN, "cuda_graph": "auto"}, {"cutmix": 1.0}, CUDA) is False
    assert [r.getMessage() for r in caplog.records].count(
        "train.cuda_graph=auto: eager steps, because aug.mixup / aug.cutmix draw from numpy's host RNG every "
        "batch, which a graph cannot replay") == 1


def test_on_is_refused_at_validation_before_any_data_is_loaded(monkeypatch):
    with pytest.raises(ConfigError) as raised:
        validate_train_config({"cuda_graph": "on", "device": "cpu"})
    assert raised.value.field == "train.cuda_graph" and "trains on cpu" in str(raised.value)
    import pitsearch.train

    monkeypatch.setattr(pitsearch.train, "resolve_device", lambda name: CUDA)   # as on a GPU machine
    with pytest.raises(ConfigError, match="^train.cuda_graph: is on, but aug.mixup / aug.cutmix"):
        validate_train_config({"cuda_graph": "on"}, {"cutmix": 1.0})
    assert validate_train_config({"cuda_graph": "on"}, {"crop_padding": 2})["cuda_graph"] == "on"
    monkeypatch.undo()
    assert validate_train_config({"cuda_graph": "auto", "device": "cpu"})["cuda_graph"] == "auto"


def test_cli_refuses_cuda_graph_on_without_cuda_in_one_line(tmp_path):
    result = run_cli(["train.device=cpu", "train.cuda_graph=on"], cwd=tmp_path, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: train.cuda_graph: is on, but"), result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def _train(compose, overrides):
    prepared = prepare(compose(TINY + overrides))
    cfg = prepared.cfg
    return train_model(prepared.model, prepared.dataset, cfg["train"], cfg["data"].get("aug"))


def test_the_graphed_loop_run_eagerly_on_the_cpu_trains_as_the_plain_loop(compose, monkeypatch):
    """Static buffers, the lr tensors the scheduler's floats fill, the device sums and the eval loop with its
    partial last batch: all but the capture itself, which needs CUDA (the gpu tests below)."""
    overrides = ["train.epochs=2", "train.device=cpu", "train.eval_batch_size=100", "data.aug.crop_padding=1",
                 "data.aug.hflip=true"]
    plain = _train(compose, overrides)
    monkeypatch.setattr(graphs, "capture_problem", lambda *args: None)   # as if on CUDA: CapturedTrainStep runs
    steps = []

    class Counted(graphs.CapturedTrainStep):
        def __call__(self, idx, generator):
            steps.append(len(idx))
            super().__call__(idx, generator)

    monkeypatch.setattr(graphs, "CapturedTrainStep", Counted)
    graphed = _train(compose, overrides + ["train.cuda_graph=auto"])
    assert steps and set(steps) == {128}
    assert graphed.history["lr"] == plain.history["lr"]
    # A float32 lr tensor instead of the Python float: the same steps to float32 rounding.
    for key in ("train/loss", "val/loss", "train/acc", "val/acc"):
        tolerance = {"rel": 1e-5} if "loss" in key else {"abs": 0.01}
        assert graphed.history[key] == pytest.approx(plain.history[key], **tolerance), key
    assert graphed.compile_seconds == 0.0   # nothing was captured


# ----------------------------------------------------------------------------------------- GPU (skipped without)

GPU_RUN = ["train.device=cuda", "train.epochs=5", "data.aug.crop_padding=1", "data.aug.hflip=true"]


@pytest.mark.gpu
def test_captured_training_matches_eager_training_in_fp32(compose):
    eager = _train(compose, GPU_RUN + ["train.precision=fp32"])
    captured = _train(compose, GPU_RUN + ["train.precision=fp32", "train.cuda_graph=on"])
    assert eager.compile_seconds == 0.0 and captured.compile_seconds > 0.0   # the capture time is recorded
    assert captured.history["lr"] == eager.history["lr"]
    assert captured.history["train/loss"] == pytest.approx(eager.history["train/loss"], rel=1e-3)
    assert abs(captured.final["val/acc"] - eager.final["val/acc"]) <= 0.02
    assert captured.final["val/acc"] > 0.5


@pytest.mark.gpu
def test_two_captured_runs_with_one_seed_give_identical_curves(compose):
    # bf16 autocast, uncached inside the capture. Should this fail, try two eager runs first: a nondeterministic
    # kernel (cuDNN weight grads, an SDPA backward with atomics) makes eager runs differ as much.
    first = _train(compose, GPU_RUN + ["train.cuda_graph=on"])
    second = _train(compose, GPU_RUN + ["train.cuda_graph=on"])
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert first.history[key] == second.history[key], key
    assert first.compile_seconds > 0.0


@pytest.mark.gpu
def test_captured_training_reaches_eager_accuracy_on_mnist5k(compose):
    """The default run (pit_nano, mnist5k), bf16: graph-captured and eager training end at the same accuracy."""
    def run(extra):
        prepared = prepare(compose(["train.epochs=3", "train.device=cuda", "train.progress=false", *extra]))
        return train_model(prepared.model, prepared.dataset, prepared.cfg["train"], prepared.cfg["data"].get("aug"))

    eager, captured = run([]), run(["train.cuda_graph=on"])
    assert abs(captured.final["val/acc"] - eager.final["val/acc"]) <= 0.02 and captured.final["val/acc"] > 0.5
