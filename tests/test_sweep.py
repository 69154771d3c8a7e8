"""The sweep engine as users run it: `python -m pitsearch --config-dir DIR +sweep=NAME` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from helpers import TINY_SWEEP, completed_cells, load_study, mlflow_runs, run_cli, states, tiny_sweep, write_sweep

pytestmark = pytest.mark.slow


def test_tiny_grid_makes_a_parent_with_one_child_per_trial_and_resumes_as_complete(tmp_path):
    config_dir = tiny_sweep(tmp_path, "tiny_grid", epochs=2)
    first = run_cli(["--config-dir", config_dir, "+sweep=tiny_grid", "sweep.report=false"], cwd=tmp_path, check=True)
    assert first.stderr.count(" COMPLETE ") == 4, first.stderr
    assert "Group by the tag model.pool" in first.stderr   # the swept tag, so the UI shows one curve per variant
    study = load_study(tmp_path, "tiny_grid")
    assert states(study) == {"COMPLETE": 4}
    assert set(completed_cells(study).values()) == {1}

    client, runs = mlflow_runs(tmp_path / "mlflow.db", "tiny_grid")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.yaml", "search_space.json",
                                                                          "summary.md"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert Counter(c.data.tags["model.pool"] for c in children) == {"conv": 2, "none": 2}
    assert sorted(c.data.tags["train.seed"] for c in children) == ["0", "0", "1", "1"]
    for child in children:
        assert child.data.tags["trial_state"] == "COMPLETE"
        assert {"trial_number", "variant", "sweep", "seed"} <= set(child.data.tags)
        assert len(client.get_metric_history(child.info.run_id, "val/acc")) == 2
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 2
    for trial in study.trials:
        assert {"config", "macs", "params", "mlflow_run_id", "history", "variant", "seed"} <= set(trial.user_attrs)

    second = run_cli(["--config-dir", config_dir, "+sweep=tiny_grid"], cwd=tmp_path, check=True)
    assert "is complete" in second.stderr and "nothing to train" in second.stderr
    assert " COMPLETE " not in second.stderr.split("is complete")[0]
    assert len(load_study(tmp_path, "tiny_grid").trials) == 4
    assert len(mlflow_runs(tmp_path / "mlflow.db", "tiny_grid")[1]) == 5


def _wait_for_running_trial(tmp_path, name, process, min_number=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        journal = tmp_path / "pitsearch-sweeps" / name / "optuna-journal.log"
        if journal.exists():
            try:
                study = load_study(tmp_path, name)
            except KeyError:
                study = None
            if study and any(t.state.name == "RUNNING" and t.number >= min_number and "mlflow_run_id" in t.user_attrs
                             for t in study.get_trials(deepcopy=False)):
                return
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


def _start_sweep(config_dir, name, cwd):
    return subprocess.Popen([sys.executable, "-m", "pitsearch", "--config-dir", str(config_dir), f"+sweep={name}",
                             "sweep.report=false"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def test_sigkill_mid_trial_then_rerun_completes_every_cell_exactly_once(tmp_path):
    config_dir = tiny_sweep(tmp_path, "killed", epochs=4)
    process = _start_sweep(config_dir, "killed", tmp_path)
    _wait_for_running_trial(tmp_path, "killed", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    rerun = run_cli(["--config-dir", config_dir, "+sweep=killed", "sweep.report=false"], cwd=tmp_path, check=True)
    assert "left RUNNING by a dead worker" in rerun.stderr
    study = load_study(tmp_path, "killed")
    counts = states(study)
    assert counts["COMPLETE"] == 4 and counts["RUNNING"] == 0 and counts["WAITING"] == 0
    assert counts["FAIL"] >= 1
    assert set(completed_cells(study).values()) == {1} and len(completed_cells(study)) == 4
    # The killed trial's MLflow run was closed as FAILED, not left RUNNING.
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "killed")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert Counter(r.info.status for r in children) == {"FINISHED": 4, "FAILED": counts["FAIL"]}


def test_ctrl_c_marks_the_running_trial_and_the_next_run_resumes(tmp_path):
    config_dir = tiny_sweep(tmp_path, "interrupted", epochs=4)
    process = _start_sweep(config_dir, "interrupted", tmp_path)
    _wait_for_running_trial(tmp_path, "interrupted", process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert process.returncode == 130, stderr   # 128 + SIGINT, after the clean-up: not a success
    study = load_study(tmp_path, "interrupted")
    counts = states(study)
    assert counts["RUNNING"] == 0 and counts["FAIL"] == 1 and counts["WAITING"] == 1
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert failed.user_attrs["fail_reason"] == "interrupted"

    run_cli(["--config-dir", config_dir, "+sweep=interrupted", "sweep.report=false"], cwd=tmp_path, check=True)
    study = load_study(tmp_path, "interrupted")
    assert states(study)["COMPLETE"] == 4 and set(completed_cells(study).values()) == {1}
    _, runs = mlflow_runs(tmp_path / "mlflow.db", "interrupted")
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_sweep_finishes(tmp_path):
    config_dir = tiny_sweep(tmp_path, "diverge", epochs=2, seeds="[0]",
                            space="    train.lr: {choices: [0.002, 1.0e+6]}")
    run_cli(["--config-dir", config_dir, "+sweep=diverge", "sweep.report=false", "train.grad_clip=0",
             "train.warmup_epochs=0"], cwd=tmp_path, check=True)
    study = load_study(tmp_path, "diverge")
    by_lr = {t.params["train.lr"]: t for t in study.trials}
    assert by_lr[0.002].state.name == "COMPLETE"
    assert by_lr[1.0e6].state.name == "PRUNED"
    assert "train/loss is" in by_lr[1.0e6].user_attrs["prune_reason"]
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "diverge")
    diverged = next(r for r in runs if r.data.tags.get("train.lr") == "1000000.0")
    assert diverged.data.tags["trial_state"] == "PRUNED" and "train/loss is" in diverged.data.tags["reason"]


def test_two_local_workers_share_a_grid_and_complete_each_cell_once(tmp_path):
    config_dir = tiny_sweep(tmp_path, "shared", epochs=1, workers=2, seeds="[0, 1, 2]")
    result = run_cli(["--config-dir", config_dir, "+sweep=shared", "sweep.report=false"], cwd=tmp_path, check=True)
    study = load_study(tmp_path, "shared")
    assert states(study) == {"COMPLETE": 6}
    assert set(completed_cells(study).values()) == {1} and len(completed_cells(study)) == 6
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, result.stderr  # both processes took trials
    assert {t.user_attrs["config"]["train"]["threads"] for t in study.trials} == {max(1, (os.cpu_count() or 1) // 2)}
    assert {t.user_attrs["config"]["train"]["progress"] for t in study.trials} == {False}


def test_median_pruner_stops_a_clearly_bad_configuration(tmp_path):
    # A grid hands cells out in a pid-dependent order (so machines start on different cells), and whether the
    # median pruner has a good run to compare with depended on it. A seeded random sampler's draws are fixed by
    # (study name, seed, trial number): seed 4 draws bad, good, bad, bad, bad, good. One training seed makes all
    # good runs identical (never below their median) and a bad run after the first good one is pruned.
    config_dir = tmp_path / "cfg"
    text = TINY_SWEEP.format(name="pruned", epochs=4, workers=1, seeds="[0]", extra="  n_trials: 6\n",
                             space="    train.lr: {choices: [0.003, 1.0e-9]}",
                             pruner="{name: median, n_startup_trials: 2, n_warmup_steps: 1}")
    write_sweep(config_dir, "pruned", text.replace("sampler: {name: grid}", "sampler: {name: random, seed: 4}"))
    run_cli(["--config-dir", config_dir, "+sweep=pruned", "sweep.report=false"], cwd=tmp_path, check=True)
    study = load_study(tmp_path, "pruned")
    bad = [t for t in study.trials if t.params["train.lr"] < 1.0e-8]
    good = [t for t in study.trials if t.params["train.lr"] == 0.003]
    assert all(t.state.name == "COMPLETE" for t in good)
    pruned = [t for t in bad if t.state.name == "PRUNED"]
    assert pruned, [(t.number, t.state.name) for t in study.trials]
    assert all(len(t.intermediate_values) < 4 for t in pruned)  # stopped before its last epoch
    assert "pruned at epoch" in pruned[0].user_attrs["prune_reason"]


@pytest.mark.parametrize("kwargs, override, field", [
    ({}, "sweep.sampler.name=annealing", "sweep.sampler"),
    ({"space": "    model.pool: {low: 3, high: 1}"}, None, "sweep.space.model.pool"),
    ({"space": "    model.poool: {choices: [a, b]}"}, None, "sweep.space.model.poool"),
    ({"space": "    train.lr: {low: 0.1, high: 0.01, log: true}"}, None, "sweep.space.train.lr"),
    ({}, "+sweep.n_trialz=3", "sweep.n_trialz"),
    ({}, "sweep.objectives=[{metric: val/acc, direction: up}]", "sweep.objectives"),
    ({"pruner": "{name: median, warmup: 3}"}, None, "sweep.pruner"),
])
def test_malformed_sweep_file_is_one_line_error_before_anything_is_created(tmp_path, kwargs, override, field):
    config_dir = tiny_sweep(tmp_path, "broken", **kwargs)
    result = run_cli(["--config-dir", config_dir, "+sweep=broken", *([override] if override else [])], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "pitsearch-sweeps").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in __import__("pitsearch.paths").paths.SWEEPS_DIR.glob("*.yaml")))
def test_shipped_sweep_files_compose_and_validate(compose, name):
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    cfg = compose([f"+sweep={name}"])
    spec = parse_sweep(cfg["sweep"], known_paths=config_paths(cfg))
    assert spec.study_name == name
    for overrides in spec.space.example_overrides():
        compose([f"+sweep={name}", *overrides])
