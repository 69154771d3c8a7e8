"""Packed trials in a sweep (`sweep.pack`, pitsearch.search.pack): the cells of one variant train as one model,
and each stays its own Optuna trial and MLflow child run with the numbers it has when it trains alone.

The engine itself (member by member equal to `train_model`) is tested in test_packed.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from helpers import completed_cells, create_study, load_study, mlflow_runs, run_cli, states, tiny_sweep, worker_context

LOSS_TOLERANCE = 1e-4   # fp32 on the CPU: same order of operations per member up to vmap's batching


def _run(compose, tmp_path, name, config_dir, extra=()):
    from pitsearch.search.worker import run_worker

    cfg, ctx = worker_context(compose, tmp_path / name, name, config_dir, extra=extra)
    create_study(cfg, tmp_path / name)
    lines: list[str] = []
    counts = run_worker(ctx, emit=lines.append)
    return load_study(tmp_path / name, name), counts, lines


def _by_cell(study) -> dict:
    return {tuple(sorted(t.params.items())): t for t in study.get_trials(deepcopy=False)
            if t.state.name in ("COMPLETE", "PRUNED")}


def test_a_packed_sweep_equals_the_unpacked_one_trial_by_trial(compose, tmp_path):
    config_dir = tiny_sweep(tmp_path, "packs", epochs=2, seeds="[0, 1, 2]")
    alone, counts_alone, _ = _run(compose, tmp_path, "packs", config_dir)
    packed, counts, lines = _run(compose, tmp_path / "packed", "packs", config_dir, extra=["sweep.pack=3"])
    assert counts == counts_alone == {"COMPLETE": 6, "PRUNED": 0, "FAIL": 0}
    assert sum("(pack of 3)" in line for line in lines) == 6, lines   # two packs of 3: conv and none
    assert set(completed_cells(packed).values()) == {1} and len(completed_cells(packed)) == 6
    reference, result = _by_cell(alone), _by_cell(packed)
    assert reference.keys() == result.keys()
    for cell, trial in result.items():
        expected = reference[cell]
        assert trial.user_attrs["final"]["val/acc"] == pytest.approx(expected.user_attrs["final"]["val/acc"], abs=1e-4)
        assert trial.user_attrs["history"]["train/loss"] == pytest.approx(
            expected.user_attrs["history"]["train/loss"], rel=LOSS_TOLERANCE)
        assert trial.values == pytest.approx(expected.values, abs=1e-4)


def test_a_diverging_member_is_pruned_alone_and_its_pack_mates_keep_their_numbers(compose, tmp_path):
    # lr is a member axis: the whole grid is one variant, one pack of 4; lr=1e6 diverges at once.
    space = "    train.lr: {choices: [0.002, 1.0e+6]}"
    config_dir = tiny_sweep(tmp_path, "divpack", epochs=2, seeds="[0, 1]", space=space)
    alone, _, _ = _run(compose, tmp_path, "divpack", config_dir)
    packed, counts, lines = _run(compose, tmp_path / "packed", "divpack", config_dir, extra=["sweep.pack=4"])
    assert counts == {"COMPLETE": 2, "PRUNED": 2, "FAIL": 0}
    assert sum("(pack of 4)" in line for line in lines) == 4, lines
    reference = _by_cell(alone)
    for cell, trial in _by_cell(packed).items():
        assert trial.state == reference[cell].state
        if trial.state.name == "PRUNED":
            assert "train/loss is nan" in trial.user_attrs["prune_reason"]
        else:
            assert trial.values == pytest.approx(reference[cell].values, abs=1e-4)


def test_a_pack_that_runs_out_of_memory_trains_its_members_alone_and_later_packs_shrink(compose, tmp_path,
                                                                                            monkeypatch):
    import torch

    import pitsearch.packed as packed

    config_dir = tiny_sweep(tmp_path, "oompack", epochs=2, seeds="[0, 1, 2]")
    alone, _, _ = _run(compose, tmp_path, "oompack", config_dir)
    real_clip, calls = packed.clip_grad_norm_per_member, []

    def oom_in_the_first_pack(*args, **kwargs):   # inside the shared step of the first pack's first batch
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(packed, "clip_grad_norm_per_member", oom_in_the_first_pack)
    result, counts, lines = _run(compose, tmp_path / "packed", "oompack", config_dir, extra=["sweep.pack=3"])
    assert counts == {"COMPLETE": 6, "PRUNED": 0, "FAIL": 0}, lines
    assert any("a pack of 3 trials ran out of memory: 3 of them train again one at a time; packs of at most 1"
               in line for line in lines), lines
    assert sum("(pack of 3)" in line for line in lines) == 3   # the first pack's members, retrained alone
    reference = _by_cell(alone)
    for cell, trial in _by_cell(result).items():   # trained from the weights they were built with
        assert trial.values == pytest.approx(reference[cell].values, abs=1e-4)


def test_pack_off_and_auto_on_the_cpu_train_one_trial_at_a_time(compose, tmp_path):
    config_dir = tiny_sweep(tmp_path, "auto", epochs=1, seeds="[0, 1]")
    _, counts, lines = _run(compose, tmp_path, "auto", config_dir, extra=["sweep.pack=auto"])
    assert counts["COMPLETE"] == 4 and not any("pack of" in line for line in lines)


def test_a_bad_pack_value_is_one_line_before_anything_is_stored(tmp_path):
    config_dir = tiny_sweep(tmp_path, "badpack")
    result = run_cli(["--config-dir", config_dir, "+sweep=badpack", "sweep.pack=many"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sweep.pack"), result.stderr
    assert not (tmp_path / "pitsearch-sweeps").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_packed_sweep_logs_a_child_run_per_member_and_resumes_after_a_kill(tmp_path):
    config_dir = tiny_sweep(tmp_path, "packkill", epochs=6, seeds="[0, 1]")
    args = ["--config-dir", str(config_dir), "+sweep=packkill", "sweep.pack=2", "sweep.report=false"]
    process = subprocess.Popen([sys.executable, "-m", "pitsearch", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:   # kill while a pack of 2 trains (both members RUNNING with their runs)
        assert process.poll() is None, process.communicate()
        if (tmp_path / "pitsearch-sweeps" / "packkill" / "optuna-journal.log").exists():
            try:
                running = [t for t in load_study(tmp_path, "packkill").get_trials(deepcopy=False)
                           if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
            except KeyError:
                running = []
            if len(running) == 2:
                break
        time.sleep(0.2)
    else:
        raise AssertionError("no pack started in time")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    rerun = run_cli(args, cwd=tmp_path, check=True)
    assert "left RUNNING by a dead worker" in rerun.stderr and "(pack of 2)" in rerun.stderr
    study = load_study(tmp_path, "packkill")
    counts = states(study)
    assert counts["COMPLETE"] == 4 and counts["RUNNING"] == 0 and counts["FAIL"] >= 2
    assert set(completed_cells(study).values()) == {1} and len(completed_cells(study)) == 4
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "packkill")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert Counter(r.info.status for r in children) == {"FINISHED": 4, "FAILED": counts["FAIL"]}
    finished = [r for r in children if r.info.status == "FINISHED"]
    for run in finished:   # each member's own curve, one point per epoch
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 6
    numbers = {int(r.data.tags["trial_number"]) for r in finished}
    assert numbers == {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
