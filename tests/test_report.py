"""The sweep report: numbers checked against independent computations on a synthetic study (where pairing by
seed matters), the CLI, and a real tiny sweep's report logged to its parent MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import (PNG_SIGNATURE, VARIANT_EFFECT, load_journal_study, read_csv, run_cli,
                     run_tiny_sweep, synthetic_study)
from optuna.trial import TrialState
from scipy import stats as sps

REPORT_PNGS = ("curves.png", "acc_vs_macs.png", "optuna_history.png")

# ------------------------------------------------------------------------------------------ a synthetic study

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
