"""Long-lived workers: in-process trials leave nothing behind, OOM fails one trial only, device-side metric sums
equal a plain loop; GPU checks (marker `gpu`) run only where CUDA is."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from helpers import TINY, create_study, load_study, run_cli, states, tiny_sweep, worker_context


def test_in_process_trials_keep_nothing_of_the_previous_trial(compose, tmp_path, monkeypatch):
    import pitsearch.experiment as experiment
    from pitsearch.search.worker import run_worker

    config_dir = tiny_sweep(tmp_path, "leak", seeds="[0, 1, 2]")
    cfg, ctx = worker_context(compose, tmp_path, "leak", config_dir)
    create_study(cfg, tmp_path)
    previous: list[weakref.ref] = []
    alive_at_next_trial: list[bool] = []
    real_run = experiment.run_packed_experiments

    def watched_run(requests, **kwargs):
        gc.collect()
        alive_at_next_trial.extend(ref() is not None for ref in previous)
        previous.clear()
        model = requests[0].prepared.model
        previous.extend([weakref.ref(model), weakref.ref(next(model.parameters()))])
        del model
        return real_run(requests, **kwargs)

    monkeypatch.setattr(experiment, "run_packed_experiments", watched_run)
    counts = run_worker(ctx, emit=lambda line: None)
    assert counts["COMPLETE"] == 6
    assert alive_at_next_trial and not any(alive_at_next_trial)


def test_out_of_memory_fails_that_trial_and_the_next_trial_runs(compose, tmp_path, monkeypatch):
    import pitsearch.train as train
    from pitsearch.search.worker import run_worker

    config_dir = tiny_sweep(tmp_path, "oom", seeds="[0]")
    cfg, ctx = worker_context(compose, tmp_path, "oom", config_dir)
    study = create_study(cfg, tmp_path)
    real_train = train.train_model
    calls = []

    def oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train, "train_model", oom_once)
    run_worker(ctx, emit=lambda line: None)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert trials[0].state.name == "FAIL" and "out of memory" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state.name == "COMPLETE"


def test_device_side_metric_sums_equal_a_plain_per_batch_loop(compose):
    import torch.nn.functional as F

    from pitsearch.augment import BatchAugment
    from pitsearch.experiment import prepare
    from pitsearch.train import evaluate

    prepared = prepare(compose(TINY + ["train.epochs=1"]))
    data, model = prepared.dataset, prepared.model.eval()
    augment = BatchAugment(prepared.cfg["data"]["aug"], data, data.num_classes)
    loss, acc = evaluate(model, data.val_x, data.val_y, augment, batch_size=64, device=data.val_x.device)
    plain_loss, plain_correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.val_y), 64):
            x = augment.eval(data.val_x[start:start + 64])
            y = data.val_y[start:start + 64]
            logits = model(x)
            plain_loss += F.cross_entropy(logits, y, reduction="sum").item()
            plain_correct += int((logits.argmax(-1) == y).sum().item())
    assert acc == plain_correct / len(data.val_y)
    assert loss == pytest.approx(plain_loss / len(data.val_y), rel=1e-6)


def test_worker_layout_pins_gpus_or_splits_cpu_cores(monkeypatch):
    from types import SimpleNamespace

    from pitsearch.search.runner import worker_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spec = SimpleNamespace(gpus=None, trials_per_gpu=2, n_workers=1)
    assert worker_devices(spec, "auto") == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert worker_devices(SimpleNamespace(gpus=[1], trials_per_gpu=1, n_workers=1), "cuda") == ["cuda:1"]
    assert worker_devices(SimpleNamespace(gpus=None, trials_per_gpu=1, n_workers=3), "cpu") == [None] * 3


# ----------------------------------------------------------------------------------------- GPU (skipped without)

@pytest.mark.gpu
@pytest.mark.slow
def test_two_trial_sweep_on_cuda(tmp_path):
    config_dir = tiny_sweep(tmp_path, "cuda2", seeds="[0]")
    run_cli(["--config-dir", config_dir, "+sweep=cuda2", "sweep.report=false"], cwd=tmp_path, check=True)
    study = load_study(tmp_path, "cuda2")
    assert states(study) == {"COMPLETE": 2}
    assert {t.user_attrs["config"]["train"]["device"] for t in study.trials} <= {"auto", "cuda", "cuda:0"}


@pytest.mark.gpu
def test_real_cuda_oom_fails_one_trial_and_memory_is_released(compose, tmp_path):
    from pitsearch.experiment import prepare, run_experiment

    def allocate_too_much(epoch, metrics):
        torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB

    cfg = compose(TINY + ["train.epochs=1", "train.device=cuda"])
    result = run_experiment(cfg, callbacks=[allocate_too_much])
    assert result.state == "FAILED" and "out of memory" in result.reason.lower()
    assert run_experiment(prepare(cfg).cfg).state == "COMPLETE"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_and_fp32_both_converge_on_mnist5k(compose, precision):
    from pitsearch.experiment import run_experiment

    result = run_experiment(compose(["train.device=cuda", f"train.precision={precision}", "train.epochs=6",
                                     "train.progress=false"]))
    assert result.state == "COMPLETE"
    assert result.final["val/acc_best"] > 0.9


def test_resume_closes_child_runs_whose_trial_is_not_running_and_leaves_live_ones(tmp_path):
    """Runs a worker opened but could not close (Ctrl-C or SIGKILL before it recorded the run, a lost MLflow
    server) are closed when the sweep starts again; the run of a trial that is still running is not touched."""
    import io

    import optuna
    from optuna.trial import TrialState
    from rich.console import Console

    from pitsearch.search.parent import close_orphan_runs
    from pitsearch.search.storage import make_storage
    from pitsearch.search.trials import mark_worker, tell
    from pitsearch.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "orphans")
    parent = tracker.start_run(run_name="sweep")
    study = optuna.create_study(study_name="orphans", storage=make_storage(None, tmp_path), direction="maximize")

    def trial_with_open_run():
        trial = study.ask()
        mark_worker(trial)   # this process: alive, so never reaped as dead
        return trial, tracker.start_run(run_name=f"t{trial.number}", tags={"trial_number": trial.number},
                                        parent_run_id=parent)

    interrupted, interrupted_run = trial_with_open_run()
    interrupted.set_user_attr("fail_reason", "interrupted")
    tell(study, interrupted, state=TrialState.FAIL)
    completed, completed_run = trial_with_open_run()
    tell(study, completed, values=0.5)
    closed, closed_run = trial_with_open_run()
    tracker.end_run(closed_run, status="FINISHED")
    tell(study, closed, values=0.6)
    _, live_run = trial_with_open_run()

    output = io.StringIO()
    console = Console(file=output, width=200)
    close_orphan_runs(study, tracker, parent, console.print)
    assert tracker.run_status(interrupted_run) == "FAILED"
    assert tracker.client.get_run(interrupted_run).data.tags["reason"] == "interrupted"
    assert tracker.run_status(completed_run) == "FINISHED"
    assert tracker.run_status(closed_run) == "FINISHED"
    assert tracker.run_status(live_run) == "RUNNING"
    assert output.getvalue().count("was left RUNNING") == 2
