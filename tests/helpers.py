"""Helpers shared by the test modules: configs and budgets (TINY, TINY_SWEEP), running the CLI as a user would
(run_cli), tiny sweeps and their studies, synthetic studies, fake data. Test modules import these from here and
never from each other; conftest.py holds the fixtures only."""

from __future__ import annotations

import csv
import os
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from pitsearch.paths import CONF_DIR

# --- configs and the CLI ---------------------------------------------------------------------------------------

# A model and data that train in well under a second per epoch on 2 CPU cores.
TINY = ["data=digits", "model.patch_size=2", "model.stride=1", "model.depths=[1,1,1]", "model.heads=[1,2,4]",
        "model.head_dims=[8,8,8]", "train.batch_size=128", "train.progress=false",
        "train.threads=1"]


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


# --- tiny sweeps and their studies -----------------------------------------------------------------------------

def tiny_sweep(tmp_path: Path, name: str, space: str = "    model.pool: {choices: [conv, none]}", epochs: int = 1,
               workers: int = 1, seeds: str = "[0, 1]", pruner: str = "{name: none}") -> Path:
    config_dir = tmp_path / "cfg"
    write_sweep(config_dir, name, TINY_SWEEP.format(name=name, space=space, epochs=epochs, workers=workers,
                                                    seeds=seeds, pruner=pruner, extra=""))
    return config_dir


def load_study(tmp_path: Path, name: str) -> optuna.Study:
    from pitsearch.search.storage import make_storage

    storage = make_storage(None, tmp_path / "pitsearch-sweeps" / name)
    return optuna.load_study(study_name=name, storage=storage)


def states(study) -> Counter:
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def completed_cells(study) -> Counter:
    return Counter(tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)
                   if t.state.name in ("COMPLETE", "PRUNED"))


def worker_context(compose, tmp_path, name, config_dir, extra=()):
    from pitsearch.search.compose import TrialComposer
    from pitsearch.search.runner import config_paths
    from pitsearch.search.trial import WorkerContext

    composer = TrialComposer(config_dir=str(__import__("pitsearch.paths").paths.CONF_DIR),
                             extra_search_paths=[str(config_dir)], overrides=[f"+sweep={name}", *extra])
    cfg = composer.compose()
    return cfg, WorkerContext(composer=composer, sweep_node=cfg["sweep"], known_paths=config_paths(cfg),
                              base_dir=str(tmp_path), tracking={"enabled": False}, parent_run_id=None)


def create_study(cfg, tmp_path):
    from pitsearch.search.study import open_sweep_study
    from pitsearch.search.spec import parse_sweep

    return open_sweep_study(parse_sweep(cfg["sweep"], base_dir=str(tmp_path)), create=True)[0]


# --- studies in a journal: exported, reported ------------------------------------------------------------------

POOLS = CategoricalDistribution(["conv", "none", "max", "avg"])


def config_for(pool: str, seed: int) -> dict:
    return {"model": {"name": "pit_nano", "pool": pool, "img_size": 8, "in_chans": 1, "num_classes": 10},
            "data": {"name": "digits"}, "train": {"seed": seed, "device": "cuda:1", "threads": 1},
            "tracking": {"experiment": "x"}, "sweep": {"study_name": "s"}}


def journal_study(cwd, name: str, directions=("maximize",), trials=()):
    """A study in the default journal location under `cwd`; trials: (state, values, pool, seed)."""
    path = cwd / "pitsearch-sweeps" / name / "optuna-journal.log"
    path.parent.mkdir(parents=True)
    study = optuna.create_study(study_name=name, directions=list(directions),
                                storage=JournalStorage(JournalFileBackend(str(path))))
    for state, values, pool, seed in trials:
        study.add_trial(create_trial(state=state, values=values, params={"model.pool": pool},
                                     distributions={"model.pool": POOLS},
                                     user_attrs={"config": config_for(pool, seed), "variant": f"model.pool={pool}"}))
    return study


TINY_REPORT_SWEEP = """# @package _global_
sweep:
  study_name: rtiny
  objectives: [{metric: val/acc_best, direction: maximize}]
  sampler: {name: grid}
  seeds: [0]
  baseline: {model.pool: none}
  space:
    model.pool: {choices: [conv, none]}
"""


def run_tiny_sweep(tmp_path_factory) -> Path:
    """A 2-trial sweep (conv / none, seed 0, 1 epoch on digits, with the analyses), run once per session:
    test_export reuses it.
    Returns its working directory (journal in pitsearch-sweeps/rtiny/, MLflow in mlflow.db)."""
    root = tmp_path_factory.getbasetemp() / "tiny-sweep"
    if not (root / "done").exists():
        root.mkdir(exist_ok=True)
        write_sweep(root / "cfg", "rtiny", TINY_REPORT_SWEEP)
        result = run_cli(["--config-dir", root / "cfg", "+sweep=rtiny", *TINY, "train.epochs=1",
                          "train.threads=1", "tracking.experiment=rtiny", "eval.spatial=true",
                          "eval.spatial_images=8", "eval.robustness=[occlusion,fgsm]", "eval.robustness_images=64"],
                         cwd=root, check=True, env={"COLUMNS": ""})   # a log file's width: links stay one line
        (root / "stderr.txt").write_text(result.stderr)
        (root / "done").write_text("ok")
    return root


def load_journal_study(path: Path, name: str):
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


SEED_EFFECT = {0: 0.00, 1: 0.20, 2: -0.15, 3: 0.12}        # large: only pairing by seed cancels it
VARIANT_EFFECT = {("conv", "[1, 1, 1]"): 0.010, ("none", "[1, 1, 1]"): 0.0,
                  ("conv", "[1, 2, 1]"): 0.030, ("none", "[1, 2, 1]"): 0.050}
SWEEP_NODE = {"study_name": "synth", "objectives": [{"metric": "val/acc_best", "direction": "maximize"}],
              "sampler": {"name": "grid"}, "seeds": [0, 1, 2, 3], "baseline": {"model.pool": "none"},
              "space": {"model.pool": {"choices": ["conv", "none"]},
                        "model.depths": {"choices": [[1, 1, 1], [1, 2, 1]]}}}
DISTRIBUTIONS = {"model.pool": CategoricalDistribution(["conv", "none"]),
                 "model.depths": CategoricalDistribution(["[1, 1, 1]", "[1, 2, 1]"]),
                 "train.seed": CategoricalDistribution([0, 1, 2, 3])}


def synthetic_study(cwd: Path, name: str = "synth"):
    """pool x depths x 4 seeds, added in shuffled order; conv/[1,1,1] seed 3 failed (so that variant has 3
    seeds and a mean over its seeds is not comparable with the baseline's 4)."""
    journal = cwd / "pitsearch-sweeps" / name / "optuna-journal.log"
    journal.parent.mkdir(parents=True)
    study = optuna.create_study(study_name=name, direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(journal))))
    cells = [(pool, depths, seed) for pool, depths in VARIANT_EFFECT for seed in SEED_EFFECT]
    random.Random(0).shuffle(cells)
    for i, (pool, depths, seed) in enumerate(cells):
        acc = 0.5 + SEED_EFFECT[seed] + VARIANT_EFFECT[(pool, depths)] + 0.001 * ((i * 7) % 5)
        history = {"train/loss": [2.0, 1.0 - acc / 2], "train/acc": [0.3, acc + 0.02], "val/acc": [0.25, acc],
                   "val/acc_best": [0.25, acc], "gen/gap": [0.05, 0.02], "perf/img_per_s": [900.0 + i, 950.0 + i]}
        final = {k: v[-1] for k, v in history.items()}
        final.update({"robust/fgsm_acc": acc - 0.2, "spatial/mean_distance_px": 3.0 + seed})
        failed = (pool, depths, seed) == ("conv", "[1, 1, 1]", 3)
        study.add_trial(create_trial(
            state=TrialState.FAIL if failed else TrialState.COMPLETE, value=None if failed else acc,
            params={"model.pool": pool, "model.depths": depths, "train.seed": seed}, distributions=DISTRIBUTIONS,
            intermediate_values={0: 0.25, 1: acc},
            user_attrs={"variant": f"model.pool={pool} model.depths={depths.replace(' ', '')}", "seed": seed,
                        "history": history, "final": {} if failed else final,
                        "macs": 1000 if pool == "conv" else 4000, "params": 50_000,
                        "config": {"sweep": SWEEP_NODE, "train": {"seed": seed}},
                        **({"fail_reason": "synthetic"} if failed else {})}))
    return study


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# A complete 2 pools x 2 seeds grid's sweep node (study `rep`); add_trial adds one of its trials.
SWEEP = {"study_name": "rep", "objectives": [{"metric": "val/acc_best", "direction": "maximize"}],
         "sampler": {"name": "grid"}, "seeds": [0, 1], "baseline": {"model.pool": "none"},
         "space": {"model.pool": {"choices": ["conv", "none"]}}}


def add_trial(study, pool: str, seed: int) -> None:
    acc = 0.8 + (0.05 if pool == "conv" else 0.0) + 0.01 * seed
    history = {"train/loss": [1.0, 0.5], "train/acc": [0.6, acc + 0.02], "val/acc": [0.5, acc],
               "val/acc_best": [0.5, acc], "gen/gap": [0.1, 0.02]}
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, value=acc, params={"model.pool": pool, "train.seed": seed},
        distributions={"model.pool": CategoricalDistribution(["conv", "none"]),
                       "train.seed": CategoricalDistribution([0, 1, 2])},
        user_attrs={"variant": f"model.pool={pool}", "seed": seed, "history": history,
                    "final": {k: v[-1] for k, v in history.items()}, "macs": 1000, "params": 5000}))


# --- fake data -------------------------------------------------------------------------------------------------

DATA_CONF = CONF_DIR / "data"


def conf(name: str, **overrides):
    """conf/data/NAME.yaml as the DictConfig Hydra would hand over, with overrides merged in."""
    return OmegaConf.merge(OmegaConf.load(DATA_CONF / f"{name}.yaml"), overrides)


def write_png_tree(root: Path, splits=("train", "val"), classes=("ant", "bee", "cat"), per_class=4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)  # 10 high, 12 wide
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def write_fake_cifar(root: Path, name: str, n: int = 4) -> None:
    """A few random images in torchvision's pickle layout: batches hold 'data' (N, 3072) uint8 rows of
    R then G then B planes, each 32x32 row-major, and 'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, batches, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], "labels"
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, batches, label_key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
    folder.mkdir(parents=True)
    for batch in batches:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(range(n))}
        (folder / batch).write_bytes(pickle.dumps(entry))
    (folder / meta_name).write_bytes(pickle.dumps(meta))
