"""The sweep report: numbers checked against independent computations on a synthetic study (where pairing by
seed matters), the CLI, and a real tiny sweep's report logged to its parent MLflow run."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import TINY, run_cli, write_sweep
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from scipy import stats as sps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_PNGS = ("curves.png", "acc_vs_macs.png", "optuna_history.png")

# ------------------------------------------------------------------------------------------ a real tiny sweep

TINY_SWEEP = """# @package _global_
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
        write_sweep(root / "cfg", "rtiny", TINY_SWEEP)
        result = run_cli(["--config-dir", root / "cfg", "+sweep=rtiny", *TINY, "train.epochs=1",
                          "train.threads=1", "tracking.experiment=rtiny", "eval.spatial=true",
                          "eval.spatial_images=8", "eval.robustness=[occlusion,fgsm]", "eval.robustness_images=64"],
                         cwd=root, check=True, env={"COLUMNS": ""})   # a log file's width: links stay one line
        (root / "stderr.txt").write_text(result.stderr)
        (root / "done").write_text("ok")
    return root


def load_journal_study(path: Path, name: str):
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


# ------------------------------------------------------------------------------------------ a synthetic study

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


def t_half_width(values) -> float:
    values = np.asarray(values, dtype=float)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
    return (high - low) / 2


def per_variant_values(study, metric: str) -> dict[tuple[str, str], dict[int, float]]:
    """(pool, depths) -> {seed: final metric} straight from the stored trials."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        key = (t.params["model.pool"], t.params["model.depths"])
        out.setdefault(key, {})[t.user_attrs["seed"]] = t.user_attrs["final"][metric]
    return out


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    from pitsearch.report import write_report
    from pitsearch.report.source import ReportSpec

    cwd = tmp_path_factory.mktemp("synthetic")
    study = synthetic_study(cwd)
    report = write_report(study, ReportSpec.from_study(study, cwd / "pitsearch-sweeps" / "synth"))
    return study, report


def test_variant_means_and_cis_match_independent_computation(synthetic_report):
    study, report = synthetic_report
    rows = {(r["model.pool"], r["model.depths"]): r for r in read_csv(report.out_dir / "variants.csv")}
    for metric in ("val/acc_best", "train/loss", "robust/fgsm_acc", "spatial/mean_distance_px"):
        for (pool, depths), by_seed in per_variant_values(study, metric).items():
            row = rows[(pool, json.dumps(json.loads(depths)))]
            values = list(by_seed.values())
            assert int(row["n"]) == len(values)
            assert float(row[f"{metric} mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            assert float(row[f"{metric} ci95"]) == pytest.approx(t_half_width(values), rel=1e-9)
    assert int(rows[("conv", "[1, 1, 1]")]["n_failed"]) == 1


def test_paired_deltas_pair_by_seed_and_other_params(synthetic_report):
    study, report = synthetic_report
    values = per_variant_values(study, "val/acc_best")
    rows = {(r["variant"], r["metric"]): r for r in read_csv(report.out_dir / "deltas.csv")}
    assert {v for v, _ in rows} == {"model.pool=conv model.depths=[1,1,1]", "model.pool=conv model.depths=[1,2,1]"}
    for depths, n_pairs in (("[1, 1, 1]", 3), ("[1, 2, 1]", 4)):
        variant, baseline = values[("conv", depths)], values[("none", depths)]   # same depths: the counterpart
        seeds = sorted(set(variant) & set(baseline))
        deltas = np.array([variant[s] - baseline[s] for s in seeds])
        row = rows[(f"model.pool=conv model.depths={depths.replace(' ', '')}", "val/acc_best")]
        assert row["baseline"] == f"model.pool=none model.depths={depths.replace(' ', '')}"
        assert int(row["n_pairs"]) == n_pairs and row["seeds"] == " ".join(map(str, seeds))
        assert float(row["mean"]) == pytest.approx(deltas.mean(), abs=1e-12)
        assert float(row["ci95"]) == pytest.approx(t_half_width(deltas), rel=1e-9)
        assert row["ci_excludes_zero"] == str(bool(abs(deltas.mean()) > t_half_width(deltas)))
        effect = VARIANT_EFFECT[("conv", depths)] - VARIANT_EFFECT[("none", depths)]
        assert float(row["mean"]) == pytest.approx(effect, abs=0.005)
    # Pairing matters: conv/[1,1,1] lacks seed 3 (a lucky seed), so its mean over seeds is far below the
    # baseline's although it is better on every common seed.
    d1 = ("conv", "[1, 1, 1]"), ("none", "[1, 1, 1]")
    naive = np.mean(list(values[d1[0]].values())) - np.mean(list(values[d1[1]].values()))
    assert naive < 0 < float(rows[("model.pool=conv model.depths=[1,1,1]", "val/acc_best")]["mean"])


def test_report_files_and_pngs(synthetic_report):
    _, report = synthetic_report
    for name in ("report.md", "variants.csv", "deltas.csv", "trials.csv", *REPORT_PNGS,
                 "optuna_intermediate.png", "optuna_importances.png"):
        assert (report.out_dir / name).stat().st_size > 0, name
    for png in report.out_dir.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png.name
    text = (report.out_dir / "report.md").read_text()
    assert "FGSM acc" in text and "![curves](curves.png)" in text
    trials = read_csv(report.out_dir / "trials.csv")
    assert len(trials) == 16 and sum(t["state"] == "FAIL" for t in trials) == 1


def test_report_cli_reads_the_spec_from_the_study_and_takes_a_baseline(tmp_path, monkeypatch, capsys):
    from pitsearch.report.__main__ import main

    synthetic_study(tmp_path)
    monkeypatch.chdir(tmp_path)   # the default storage: ./pitsearch-sweeps/STUDY/optuna-journal.log
    assert main(["synth", "--baseline", "model.pool=conv"]) == 0
    out = tmp_path / "pitsearch-sweeps" / "synth" / "report"
    rows = read_csv(out / "deltas.csv")
    assert {r["baseline"] for r in rows} == {"model.pool=conv model.depths=[1,1,1]",
                                              "model.pool=conv model.depths=[1,2,1]"}
    assert {r["variant"] for r in rows} == {"model.pool=none model.depths=[1,1,1]",
                                             "model.pool=none model.depths=[1,2,1]"}
    assert "paired deltas" in capsys.readouterr().err


def test_report_cli_unknown_study_writes_nothing(tmp_path):
    """Through the real command line: `python -m pitsearch.report` with a study that does not exist."""
    result = run_cli(["nosuch"], cwd=tmp_path, module="pitsearch.report")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sweep_report_is_logged_to_the_parent_run(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = run_tiny_sweep(tmp_path_factory)
    study = load_journal_study(root / "pitsearch-sweeps" / "rtiny" / "optuna-journal.log", "rtiny")
    out = root / "pitsearch-sweeps" / "rtiny" / "report"
    for png in REPORT_PNGS:
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"report.html", "report.md", "variants.csv", "deltas.csv", "trials.csv", *REPORT_PNGS} <= logged
    # The sweep's last line opens that report page in MLflow's Model-training view; one seed decides nothing.
    printed = (root / "stderr.txt").read_text().strip().splitlines()
    experiment = client.get_run(parent).info.experiment_id
    assert printed[-1].startswith("browse: mlflow ui --backend-store-uri sqlite:///"), printed[-3:]
    assert printed[-1].endswith(f"#/experiments/{experiment}/runs/{parent}/artifacts/report/report.html"
                                "?workflowType=machine_learning")
    assert any(line.startswith("decision (val/acc_best): model.pool=conv - model.pool=none = ")
               and "on 1 seed: no interval" in line for line in printed)
    history = client.get_metric_history(parent, "variant/model.pool_conv/val/acc")
    assert [m.step for m in history] == [0]     # one epoch, one point
    rows = {r["model.pool"]: r for r in read_csv(out / "variants.csv")}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        row = rows[trial.params["model.pool"]]
        assert float(row["val/acc_best mean"]) == trial.user_attrs["final"]["val/acc_best"]   # one seed each
        assert int(row["macs"]) == trial.user_attrs["macs"]
    metrics = client.get_run(parent).data.metrics
    assert metrics["variant/model.pool_conv/val_acc_best_mean"] == float(rows["conv"]["val/acc_best mean"])
    delta = read_csv(out / "deltas.csv")[0]
    assert delta["variant"] == "model.pool=conv" and delta["baseline"] == "model.pool=none"
    assert study.user_attrs["sweep_spec"]["baseline"] == {"model.pool": "none"}


@pytest.mark.slow
def test_sweep_report_shows_the_analyses_of_each_variant(tmp_path_factory):
    root = run_tiny_sweep(tmp_path_factory)
    study = load_journal_study(root / "pitsearch-sweeps" / "rtiny" / "optuna-journal.log", "rtiny")
    out = root / "pitsearch-sweeps" / "rtiny" / "report"
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        profile = trial.user_attrs["spatial"]
        assert len(profile["distance_px"]) == 3 and profile["images"] == 8   # depths [1, 1, 1]
        assert trial.user_attrs["final"]["spatial/mean_distance_px"] == pytest.approx(
            sum(profile["distance_px"]) / 3)
    assert (out / "spatial.png").read_bytes()[:8] == PNG_SIGNATURE
    header = (out / "variants.csv").read_text().splitlines()[0]
    for metric in ("robust/occlusion_acc", "robust/fgsm_acc", "spatial/mean_interaction_ratio"):
        assert f"{metric} mean" in header, header
