"""Seeds until decided, end to end: `sweep.seeds: {min, max, min_effect}` adds seeds only to open comparisons,
survives a SIGKILL mid-round, and never trains a seed twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from helpers import TINY_SWEEP, load_study, run_cli, write_sweep

pytestmark = pytest.mark.slow

# train.progress changes nothing a run computes: progress=true vs the baseline's progress=false has deltas of
# exactly 0, so that comparison is "equivalent" at the first look (2 seeds) and gets no more seeds. The
# model.pool=conv comparisons differ from the baseline, so (at this size) they stay open and get seeds.
SPACE = "    model.pool: {choices: [none, conv]}\n    train.progress: {choices: [false, true]}"
BASELINE = "  baseline: {model.pool: none, train.progress: false}\n"
SEEDS = "{min: 2, max: 3, min_effect: 0.005}"   # 11 cells at most: a short test
EQUIVALENT = "model.pool=none train.progress=true"


def adaptive_sweep(tmp_path, name, seeds=SEEDS, extra=BASELINE):
    config_dir = tmp_path / "cfg"
    write_sweep(config_dir, name, TINY_SWEEP.format(name=name, space=SPACE, epochs=2, workers=1, seeds=seeds,
                                                    pruner="{name: none}", extra=extra))
    return config_dir


def test_adaptive_sweep_adds_seeds_where_undecided_survives_a_kill_and_reports_decisions(tmp_path):
    config_dir = adaptive_sweep(tmp_path, "adaptive")
    # Without MLflow (tracking.enabled=false): the rounds are the Optuna study's business, and each trial is
    # seconds faster.
    process = subprocess.Popen([sys.executable, "-m", "pitsearch", "--config-dir", str(config_dir), "+sweep=adaptive",
                                "sweep.report=false", "tracking.enabled=false"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:   # kill in round 2: a trial of seed 2 is running
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            study = load_study(tmp_path, "adaptive")
        except (KeyError, FileNotFoundError):   # not created yet
            study = None
        if study and any(t.state.name == "RUNNING" and "config" in t.user_attrs
                             and t.params.get("train.seed") == 2 for t in study.trials):
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    rerun = run_cli(["--config-dir", config_dir, "+sweep=adaptive", "tracking.enabled=false"], cwd=tmp_path,
                    check=True)
    assert "left RUNNING by a dead worker" in rerun.stderr
    study = load_study(tmp_path, "adaptive")
    assert Counter(t.state.name for t in study.trials)["RUNNING"] == 0
    done = Counter((t.user_attrs["variant"], t.params["train.seed"]) for t in study.trials
                   if t.state.name == "COMPLETE")
    assert set(done.values()) == {1}                     # no seed trained twice
    seeds = {}
    for variant, seed in done:
        seeds.setdefault(variant, []).append(seed)
    seeds = {v: sorted(s) for v, s in seeds.items()}
    assert seeds[EQUIVALENT] == [0, 1]                  # decided at the first look: no seed added
    baseline = seeds["model.pool=none train.progress=false"]
    assert all(s == list(range(len(s))) for s in seeds.values())   # every variant's seeds are a prefix
    assert len(baseline) == max(len(s) for s in seeds.values()) > 2
    assert "round 2: seed 2 added to" in rerun.stderr and f"{EQUIVALENT}: equivalent (2 seeds)" in rerun.stderr
    assert f"decision (val/acc_best): {EQUIVALENT} is equivalent" in rerun.stderr
    report = (tmp_path / "pitsearch-sweeps" / "adaptive" / "report" / "report.md").read_text()
    assert "sequential design (seeds min 2, max 3)" in report and EQUIVALENT in report


@pytest.mark.parametrize("seeds, extra, key", [
    ("{min: 1, max: 4}", BASELINE, "sweep.seeds.min"),
    ("{min: 2, max: 4}", "", "sweep.baseline"),
])
def test_bad_adaptive_seeds_are_one_line_exit_2(tmp_path, seeds, extra, key):
    config_dir = adaptive_sweep(tmp_path, "bad", seeds=seeds, extra=extra)
    result = run_cli(["--config-dir", config_dir, "+sweep=bad"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr
