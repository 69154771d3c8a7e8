"""The short-run trainer and `python -m pitsearch`: curves, MLflow logging, determinism, clear errors."""

from __future__ import annotations

import math
import weakref

import pytest

from helpers import TINY, mlflow_runs, run_cli
from pitsearch.errors import ConfigError
from pitsearch.experiment import prepare, run_experiment
from pitsearch.train import METRIC_KEYS
from pitsearch.tracking import Tracker, resolve_tracking_uri

PER_EPOCH = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "gen/gap", "lr", "time/epoch_s",
             "perf/img_per_s")


def test_two_epochs_on_mnist5k_log_two_points_of_every_metric(compose, tmp_path):
    cfg = compose(["train.epochs=2", "train.progress=false", "model.depths=[1,1,1]"])
    tracker = Tracker.from_config(cfg["tracking"], tmp_path)
    result = run_experiment(cfg, tracker=tracker)
    assert result.state == "COMPLETE"
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key in PER_EPOCH:
        history = tracker.metric_history(result.run_id, key)
        assert [step for step, _ in history] == [0, 1], key
    run = tracker.client.get_run(result.run_id)
    # An MNIST run builds a 1-channel, 10-class, 28 px model without being told.
    assert run.data.params["model.in_chans"] == "1"
    assert run.data.params["model.num_classes"] == "10"
    assert run.data.params["model.img_size"] == "28"
    assert run.data.tags["pool"] == "conv" and run.data.tags["dataset"] == "mnist5k" and run.data.tags["seed"] == "0"
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in tracker.client.list_artifacts(result.run_id)}
    assert {"config.yaml", "curves.png", "model_stats.json"} <= artifacts
    val_acc = result.history["val/acc"]
    assert result.history["val/acc_best"] == [val_acc[0], max(val_acc)]
    assert result.history["gen/gap"] == pytest.approx([a - b for a, b in zip(result.history["train/acc"], val_acc)])
    assert val_acc[-1] > 0.5  # two epochs of a real digit set learn something


def test_same_config_and_seed_give_identical_metrics_on_cpu(compose):
    cfg = compose(TINY + ["train.epochs=2", "train.device=cpu"])
    first = run_experiment(cfg).history
    second = run_experiment(cfg).history
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert first[key] == second[key], key
    other_seed = run_experiment(compose(TINY + ["train.epochs=2", "train.seed=1"])).history
    assert other_seed["train/loss"] != first["train/loss"]


def test_callback_sees_every_epoch_and_can_stop_the_run(compose):
    from pitsearch.runstate import StopRun

    seen = []

    def stop_after_first(epoch, metrics):
        seen.append((epoch, set(metrics)))
        if epoch == 0:
            raise StopRun("enough", state="PRUNED")

    result = run_experiment(compose(TINY + ["train.epochs=3"]), callbacks=[stop_after_first])
    assert result.state == "PRUNED" and result.reason == "enough"
    assert [epoch for epoch, _ in seen] == [0]
    assert set(METRIC_KEYS) <= seen[0][1]
    assert len(result.history["train/loss"]) == 1  # the curve so far is kept


def test_absurd_learning_rate_diverges_and_is_stopped_with_reason(compose):
    result = run_experiment(compose(TINY + ["train.epochs=3", "train.lr=1e6", "train.grad_clip=0",
                                            "train.warmup_epochs=0"]))
    assert result.state == "PRUNED"
    assert "train/loss is nan" in result.reason or "train/loss is inf" in result.reason
    assert not math.isfinite(result.history["train/loss"][-1])


def test_nothing_of_the_model_outlives_the_run(compose):
    prepared = prepare(compose(TINY + ["train.epochs=1"]))
    model_ref = weakref.ref(prepared.model)
    run_experiment(prepared.cfg, prepared=prepared)
    del prepared
    import gc

    gc.collect()
    assert model_ref() is None


@pytest.mark.parametrize("override, field", [
    ("train.epochs=0", "train.epochs"),
    ("train.lr=-1", "train.lr"),
    ("train.device=tpu", "train.device"),
    ("train.opt=nonsense", "train.opt"),
    ("train.label_smoothing=1.5", "train.label_smoothing"),
])
def test_bad_train_values_name_their_field(compose, override, field):
    with pytest.raises(ConfigError) as error:
        prepare(compose(TINY + [override]))
    assert str(error.value).startswith(f"{field}:")
    assert "\n" not in str(error.value)


def test_ctrl_c_while_a_run_logs_its_config_still_ends_the_run(compose, tmp_path, monkeypatch):
    import pitsearch.experiment as experiment

    def interrupted(*args):
        raise KeyboardInterrupt

    cfg = compose(TINY + ["train.epochs=1"])
    tracker = Tracker.from_config(cfg["tracking"], tmp_path)
    started = []
    monkeypatch.setattr(experiment, "_log_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tracker=tracker, on_run_started=started.append)
    assert tracker.run_status(started[0]) == "FAILED"   # not left RUNNING for ever


def test_relative_sqlite_uri_is_made_absolute(tmp_path):
    assert resolve_tracking_uri("sqlite:///runs.db", tmp_path) == f"sqlite:///{tmp_path / 'runs.db'}"
    with pytest.raises(ConfigError, match="tracking.uri"):
        resolve_tracking_uri("./mlruns", tmp_path)


def test_cli_trains_logs_and_prints_where_to_look(tmp_path):
    # stderr to a pipe and no COLUMNS, as in a worker's log file: the link must not be wrapped at 80 columns
    result = run_cli(TINY + ["train.epochs=2"], cwd=tmp_path, check=True, env={"COLUMNS": ""})
    assert "COMPLETE: val/acc_best" in result.stderr
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stderr
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "pitsearch")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    link = f"/runs/{runs[0].info.run_id}"
    assert any(line.startswith("browse: mlflow ui") and link in line for line in result.stderr.splitlines()), \
        result.stderr
    assert len(client.get_metric_history(runs[0].info.run_id, "val/acc")) == 2


@pytest.mark.parametrize("args, expected", [
    (["data=imagefolder", "data.root=/no/such/folder"], "/no/such/folder"),
    (["data=cifar10"], "data.root"),
    (["model.pool=maxx"], "model.pool"),
    (["model.depths=[1,2]"], "model."),
])
def test_cli_bad_input_is_one_line_and_leaves_no_run(tmp_path, args, expected):
    result = run_cli(TINY + args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_unknown_group_option_lists_the_valid_choices(tmp_path):
    result = run_cli(["data=mnist6k"], cwd=tmp_path)
    assert result.returncode != 0
    assert "mnist5k" in result.stderr and "digits" in result.stderr
