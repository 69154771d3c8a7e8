"""`python -m pitsearch.export`: ranking, the files, re-running rank1 reproduces the trial, error cases."""

from __future__ import annotations

import pytest
import yaml
from helpers import journal_study, load_journal_study, mlflow_runs, run_cli, run_tiny_sweep
from optuna.trial import TrialState

from pitsearch.export import main, rank_trials


def test_rank_order_follows_the_study_direction(tmp_path):
    done = TrialState.COMPLETE
    trials = [(done, [0.5], "conv", 0), (TrialState.FAIL, None, "max", 0), (done, [0.9], "none", 1),
              (done, [0.7], "avg", 2), (done, [0.9], "max", 3)]
    study = journal_study(tmp_path, "up", trials=trials)
    assert [t.number for t in rank_trials(study)] == [2, 4, 3, 0]     # ties: the earlier trial first
    down = journal_study(tmp_path, "down", directions=("minimize",), trials=trials)
    assert [t.number for t in rank_trials(down, top_k=2)] == [0, 3]
    pareto = journal_study(tmp_path, "pareto", directions=("maximize", "minimize"), trials=[
        (done, [0.9, 300.0], "none", 0), (done, [0.8, 100.0], "conv", 0), (done, [0.7, 200.0], "avg", 0)])
    assert [t.number for t in rank_trials(pareto)] == [0, 1]        # the front, best first objective first
    assert {t.number for t in rank_trials(pareto)} == {t.number for t in pareto.best_trials}


def test_export_writes_full_and_model_configs(tmp_path, capsys):
    trials = [(TrialState.COMPLETE, [0.5], "conv", 0), (TrialState.COMPLETE, [0.9], "none", 1),
              (TrialState.COMPLETE, [0.7], "avg", 2)]
    study = journal_study(tmp_path, "s", trials=trials)
    out = tmp_path / "exported"
    assert main(["s", "--storage", str(tmp_path / "pitsearch-sweeps/s/optuna-journal.log"), "--top-k", "2",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.yaml")) == ["rank1.yaml", "rank2.yaml"]
    for rank, trial in enumerate(rank_trials(study, 2), start=1):
        text = (out / f"rank{rank}.yaml").read_text()
        config = yaml.safe_load(text)
        stored = trial.user_attrs["config"]
        assert config["model"] == stored["model"] and config["data"] == stored["data"]
        assert "sweep" not in config and config["hydra"]["job"]["chdir"] is False
        assert config["train"] == {**stored["train"], "device": "cuda"}   # the pinned GPU index is dropped
        model = yaml.safe_load((out / "model" / f"rank{rank}.yaml").read_text())
        assert model["pool"] == stored["model"]["pool"] and model["img_size"] is None
        assert f"--config-name rank{rank}" in capsys.readouterr().out or rank == 2
    # a shorter export removes the stale rank2 files it wrote before
    assert main(["s", "--storage", str(tmp_path / "pitsearch-sweeps/s/optuna-journal.log"), "--top-k", "1",
                 "--out", str(out)]) == 0
    assert not (out / "rank2.yaml").exists() and not (out / "model" / "rank2.yaml").exists()


@pytest.mark.parametrize("case", ["unknown", "empty", "no_complete"])
def test_nothing_to_export_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case):
    if case == "empty":
        journal_study(tmp_path, "study")
    elif case == "no_complete":
        journal_study(tmp_path, "study", trials=[(TrialState.FAIL, None, "conv", 0),
                                                 (TrialState.PRUNED, None, "none", 0)])
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "exported"
    if case == "unknown":   # once through the real command line
        result = run_cli(["study", "--out", out], cwd=tmp_path, module="pitsearch.export")
        code, err = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)   # the default storage is the journal under the working directory
        code, err = main(["study", "--out", str(out)]), capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_rerunning_rank1_reproduces_its_val_acc_best(tmp_path_factory, tmp_path, monkeypatch, capsys):
    root = run_tiny_sweep(tmp_path_factory)
    study = load_journal_study(root / "pitsearch-sweeps" / "rtiny" / "optuna-journal.log", "rtiny")
    out = tmp_path / "exported"
    monkeypatch.chdir(root)
    assert main(["rtiny", "--top-k", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    best = rank_trials(study)[0]
    assert f"trial {best.number} " in printed.splitlines()[0]
    assert f"--config-dir {out} --config-name rank1" in printed
    assert yaml.safe_load((out / "rank1.yaml").read_text())["train"]["threads"] == 1   # as the sweep ran it

    rerun = tmp_path / "rerun"
    rerun.mkdir()
    result = run_cli(["--config-dir", out, "--config-name", "rank1"], cwd=rerun)
    assert result.returncode == 0, result.stderr
    _, runs = mlflow_runs(rerun / "mlflow.db", "rtiny")
    assert len(runs) == 1
    assert runs[0].data.metrics["val/acc_best"] == best.user_attrs["final"]["val/acc_best"] == best.value
    assert runs[0].data.tags["pool"] == best.params["model.pool"]
