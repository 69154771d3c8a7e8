"""`sweep.match` (compute-matched variants): keys checked in one line, every variant solved before the study
exists, the matched model trained and recorded (trial attributes, MLflow params and tags, the report)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from helpers import TINY_SWEEP, mlflow_runs, run_cli, write_sweep
from pitsearch.errors import ConfigError

MATCH_CONV = "  match: {on: macs, reference: {model.pool: conv}, adjust: model.head_dims, tolerance: 0.05}\n"


def _tiny(tmp_path: Path, name: str, match: str, seeds: str = "[0]") -> Path:
    config_dir = tmp_path / "cfg"
    write_sweep(config_dir, name, TINY_SWEEP.format(name=name, space="    model.pool: {choices: [conv, none]}",
                                                    epochs=1, workers=1, seeds=seeds, pruner="{name: none}",
                                                    extra=match))
    return config_dir


def _spec(compose, name: str, overrides=()):
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    cfg = compose([f"+sweep={name}", *overrides])
    return parse_sweep(cfg["sweep"], known_paths=config_paths(cfg))


@pytest.mark.parametrize("match, field, fragment", [
    ("{reference: {model.pool: conv}, adjust: model.heads}", "sweep.match.adjust", "unknown knob 'model.heads'"),
    ("{reference: {model.pool: conv}, tolerance: 2}", "sweep.match.tolerance", "[0, 1)"),
    ("{on: flops, reference: {model.pool: conv}}", "sweep.match.on", "macs"),
    ("{referance: {model.pool: conv}}", "sweep.match.referance", "unknown key"),
    ("{adjust: model.depths}", "sweep.match.reference", "must be a mapping"),
    ("{reference: {train.lr: 0.1}}", "sweep.match.reference.train.lr", "model.KEY"),
    ("{reference: {model.pol: conv}}", "sweep.match.reference.model.pol", "neither a swept parameter"),
])
def test_bad_match_keys_are_one_line_naming_the_key(compose, match, field, fragment):
    with pytest.raises(ConfigError) as error:
        _spec(compose, "pooling_ablation", [f"+sweep.match={match}"])
    assert error.value.field == field and fragment in str(error.value) and "\n" not in str(error.value)


def test_match_defaults_and_the_yaml_on_key(compose):
    from pitsearch.search.match import parse_match

    spec = _spec(compose, "pooling_ablation_matched", ["sweep.match.on=params", "sweep.match.tolerance=0.1"])
    assert (spec.match.on, spec.match.tolerance) == ("params", 0.1) and spec.raw["match"]["on"] == "params"
    # an unquoted `on:` is YAML 1.1's boolean true; a string `on` (from the command line) wins over it
    assert parse_match({True: "params", "reference": {"model.pool": "conv"}}, ["model.pool"], None).on == "params"
    assert parse_match({True: "params", "on": "macs", "reference": {"model": "vit_nano"}}, [], None).on == "macs"
    spec = _spec(compose, "pooling_ablation", ["+sweep.match={reference: {model.pool: conv}}"])
    assert (spec.match.on, spec.match.adjust, spec.match.tolerance) == ("macs", ["model.head_dims"], 0.03)
    assert _spec(compose, "pooling_ablation").match is None


@pytest.mark.parametrize("name, expected", [
    # variant label -> (changes, matched MACs, reference MACs), or None for the reference itself
    ("pooling_ablation_matched", {"model.pool=conv": None,
                                  "model.pool=max": ({}, 6_336_512, 6_236_352),
                                  "model.pool=avg": ({}, 6_336_512, 6_236_352),
                                  "model.pool=none": ({"model.head_dims": [7, 6, 7]}, 6_155_584, 6_236_352)}),
    ("pit_vs_vit", {"model=pit_nano": None,
                    "model=vit_nano": ({"model.head_dims": [17]}, 12_511_592, 13_054_784)}),
])
def test_shipped_matched_sweeps_solve_every_variant_in_the_preflight(compose, name, expected):
    from pitsearch.search.compose import TrialComposer
    from pitsearch.search.match import check_match
    from pitsearch.search.preflight import preflight_configs

    spec = _spec(compose, name)
    configs, labels = preflight_configs(spec, TrialComposer(overrides=[f"+sweep={name}"]))
    solved = {label: None if r is None else (r.changes, r.value, r.reference_value)
              for label, r in check_match(spec.match, configs, labels)}
    assert solved == expected
    for label, result in solved.items():
        if result is not None:
            assert abs(result[1] / result[2] - 1) <= spec.match.tolerance


def test_preflight_solves_every_combination_of_a_grid(compose, tmp_path):
    from pitsearch.search.compose import TrialComposer
    from pitsearch.search.preflight import preflight_configs

    space = "    model.pool: {choices: [conv, none]}\n    model.depths: {choices: [[1, 1, 1], [2, 1, 1]]}"
    config_dir = tmp_path / "cfg"
    write_sweep(config_dir, "combo", TINY_SWEEP.format(name="combo", space=space, epochs=1, workers=1,
                                                       seeds="[0, 1]", pruner="{name: none}", extra=MATCH_CONV))
    composer = TrialComposer(extra_search_paths=[str(config_dir)], overrides=["+sweep=combo"])
    cfg = composer.compose()
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    spec = parse_sweep(cfg["sweep"], known_paths=config_paths(cfg))
    _, labels = preflight_configs(spec, composer)
    assert len(set(labels)) == 4   # the examples alone (2 rows) would miss two of the four variants


@pytest.mark.slow
def test_an_impossible_match_is_one_line_before_anything_is_stored(tmp_path):
    # depths alone cannot bring the tiny `none` model (5.4x conv's MACs) within 1%: it can only add blocks
    match = "  match: {on: macs, reference: {model.pool: conv}, adjust: model.depths, tolerance: 0.01}\n"
    config_dir = _tiny(tmp_path, "impossible", match)
    result = run_cli(["--config-dir", config_dir, "+sweep=impossible"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: sweep.match: cannot bring variant model.pool=none within 1%")
    assert "closest valid setting reached 1,120,288 (5.363x)" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "pitsearch-sweeps").exists()


@pytest.mark.slow
def test_a_matched_sweep_trains_and_records_the_matched_models(tmp_path):
    from pitsearch.search.storage import make_storage

    config_dir = _tiny(tmp_path, "matched", MATCH_CONV, seeds="[0, 1]")
    run_cli(["--config-dir", config_dir, "+sweep=matched"], cwd=tmp_path, check=True)
    storage = make_storage(None, tmp_path / "pitsearch-sweeps" / "matched")
    trials = optuna.load_study(study_name="matched", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    conv = [t for t in trials if t.params["model.pool"] == "conv"]
    none = [t for t in trials if t.params["model.pool"] == "none"]
    reference_macs = conv[0].user_attrs["macs"]
    for trial in conv:
        assert trial.user_attrs["matched"] == {"reference": True, "on": "macs"}
        assert trial.user_attrs["config"]["model"]["head_dims"] == [8, 8, 8]
    for trial in none:
        matched = trial.user_attrs["matched"]
        assert matched["reference"] is False and matched["knob"] == "model.head_dims"
        # the counted MACs of the model that trained are the solver's, within tolerance of conv's counted MACs
        assert trial.user_attrs["macs"] == matched["value"] and matched["reference_value"] == reference_macs
        assert abs(trial.user_attrs["macs"] / reference_macs - 1) <= 0.05
        assert trial.user_attrs["config"]["model"]["head_dims"] == matched["changes"]["model.head_dims"] != [8, 8, 8]

    _, runs = mlflow_runs(tmp_path / "mlflow.db", "matched")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    for run in children:
        if run.data.tags["model.pool"] == "conv":
            assert run.data.tags["matched.reference"] == "true" and run.data.params["matched.reference"] == "true"
            continue
        params, tags = run.data.params, run.data.tags
        assert tags["matched.reference"] == "false" and tags["matched.knob"] == "model.head_dims"
        assert int(params["matched.macs"]) == int(params["model.macs"])
        assert int(params["matched.reference_macs"]) == reference_macs
        assert abs(float(tags["matched.ratio"]) - 1) <= 0.05
        assert json.loads(params["matched.model.head_dims"]) == json.loads(params["model.head_dims"])

    report = (tmp_path / "pitsearch-sweeps" / "matched" / "report" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| variant | n |"))
    assert header.rstrip(" |").endswith("matched")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| model.pool=")}
    assert rows["model.pool=conv"].rstrip(" |").endswith("reference")
    ratio = none[0].user_attrs["matched"]["ratio"]
    assert f"head_dims {none[0].user_attrs['matched']['changes']['model.head_dims']}, {ratio:.3f}x MACs" \
        in rows["model.pool=none"]
