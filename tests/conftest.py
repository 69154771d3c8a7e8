"""Shared test helpers: compose configs in-process, run the CLI in a subprocess, tiny budgets everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pitsearch.paths import CONF_DIR

# A model and data that train in well under a second per epoch on 2 CPU cores.
TINY = ["data=digits", "model.patch_size=2", "model.stride=1", "model.depths=[1,1,1]", "model.heads=[1,2,4]",
        "model.head_dims=[8,8,8]", "train.batch_size=128", "train.progress=false",
        "train.threads=1"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def compose(tmp_path, monkeypatch):
    """compose(overrides) -> the resolved config dict, as `python -m pitsearch` would build it, cwd = tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)

    def _compose(overrides=(), config_dir=None):
        with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)

    return _compose


def run_cli(args, cwd, module="pitsearch", timeout=300, env=None, check=False):
    """Run `python -m <module> args` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


# A tiny model on digits: a sweep whose trials take seconds. `extra`: more `sweep:` lines, each "  key: value\n".
TINY_SWEEP = """# @package _global_
defaults:
  - /sweep_base@sweep: default
  - override /data: digits
model:
  patch_size: 2
  stride: 1
  depths: [1, 1, 1]
  heads: [1, 2, 4]
  head_dims: [8, 8, 8]
train:
  epochs: {epochs}
  progress: false
  threads: 1
tracking:
  experiment: {name}
sweep:
  study_name: {name}
  objectives: [{{metric: val/acc_best, direction: maximize}}]
  sampler: {{name: grid}}
  pruner: {pruner}
  n_workers: {workers}
  seeds: {seeds}
{extra}  space:
{space}
"""


def write_sweep(config_dir: Path, name: str, text: str) -> Path:
    """A user's own sweep file outside the repo: <config_dir>/sweep/<name>.yaml, used with --config-dir."""
    path = Path(config_dir) / "sweep" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mlflow_runs(db_path: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db_path}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client, []
    return client, client.search_runs([found.experiment_id], max_results=1000)
