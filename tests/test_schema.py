"""The config schema (pitsearch.config.schema): every field of every group refuses a wrong type in one line naming
the field, through the same composition and checks `python -m pitsearch` runs; the YAML files set only keys the
schema knows; the schema's defaults are what training, the analyses and sweeps use."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pitsearch.config import check_config, checked
from pitsearch.config import schema as schemas
from pitsearch.errors import ConfigError
from pitsearch.paths import CONF_DIR, SWEEPS_DIR

# A value of the wrong type for each kind of field, as a command line spells it.
WRONG = {int: "true", float: "abc", bool: "abc", str: "[1,2]", list: "abc", dict: "abc"}


def _kind(hint):
    if typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return origin
    return dict if dataclasses.is_dataclass(hint) else hint


def _fields(schema, prefix):
    """(dotted path, wrong value) for every typed field, nested dataclasses included; Any fields have none."""
    hints = typing.get_type_hints(schema, vars(schemas))
    for f in dataclasses.fields(schema):
        kind = _kind(hints[f.name])
        if kind is typing.Any:
            continue
        yield f"{prefix}.{f.name}", WRONG[kind]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}.{f.name}")


SWEEP = "+sweep=pooling_ablation"
CASES = [
    *[(["model=pit_nano"], path, value) for path, value in _fields(schemas.ModelConfig, "model")],
    *[([f"data={name}"], path, value) for name, schema in schemas.DATA_SCHEMAS.items()
      for path, value in _fields(schema, "data")],
    *[([], path, value) for path, value in _fields(schemas.TrainConfig, "train")],
    *[([], path, value) for path, value in _fields(schemas.TrackingConfig, "tracking")],
    *[([], path, value) for path, value in _fields(schemas.EvalConfig, "eval")],
    *[([SWEEP], path, value) for path, value in _fields(schemas.SweepConfig, "sweep")],
    # Any-typed sweep fields: their domain checks (pitsearch.search.spec) name them the same way.
    ([SWEEP], "sweep.seeds", "abc"), ([SWEEP], "sweep.space", "abc"), ([SWEEP], "sweep.match", "abc"),
    ([SWEEP], "sweep.pack", "abc"), ([SWEEP], "sweep.pack", "0"),
]


def _error_line(compose, overrides) -> str:
    """What the CLI prints for `overrides`: Hydra's composition, the schema check (the run's Hydra callback),
    then the sweep's own checks; the failure through pitsearch.cli.known_failure."""
    from pitsearch.cli import known_failure
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    try:
        cfg = compose(overrides)
        check_config(cfg)
        if cfg.get("sweep") is not None:
            parse_sweep(cfg["sweep"], known_paths=config_paths(cfg))
    except Exception as error:  # noqa: BLE001 - every failure is judged as the CLI judges it
        known = known_failure(error)
        assert known is not None, f"{overrides}: not a known failure: {error!r}"
        assert known[0] == 2
        return known[1]
    raise AssertionError(f"{overrides}: accepted")


@pytest.mark.parametrize("base, path, value", CASES, ids=[f"{c[0][0] if c[0] else ''} {c[1]}" for c in CASES])
def test_every_field_refuses_a_wrong_type_in_one_line_naming_it(compose, base, path, value):
    line = _error_line(compose, [*base, f"{path}={value}"])
    assert line.startswith(f"{path}") and line[len(path)] in ":[", line
    assert "\n" not in line


@pytest.mark.parametrize("override, line", [
    ("train.epochs=true", "train.epochs: must be an integer >= 1, got 'true'"),
    ("train.lr=abc", "train.lr: must be a number > 0, got 'abc'"),
    ("train.threads=1.5", "train.threads: must be an integer >= 1 or null, got '1.5'"),
    ("model.cls_pos_embed=maybe", "model.cls_pos_embed: must be true or false, got 'maybe'"),
    ("eval.robustness=fgsm", "eval.robustness: must be a list of strings or null, got 'fgsm'"),
    ("+train.momentum=0.9", "train.momentum: unknown key; valid: epochs, batch_size, eval_batch_size, opt, lr, "
                            "min_lr, weight_decay, warmup_epochs, warmup_lr, label_smoothing, grad_clip, seed, "
                            "device, threads, compile, precision, cuda_graph, progress"),
])
def test_the_line_says_what_the_field_must_be(compose, override, line):
    assert _error_line(compose, [override]) == line


def test_a_bool_is_not_an_int_nor_a_number_given_as_a_dict():
    for group, key in (("train", "epochs"), ("train", "seed"), ("train", "lr"), ("eval", "spatial_images")):
        with pytest.raises(ConfigError) as raised:
            checked(group, {key: True})
        assert raised.value.field == f"{group}.{key}"
    with pytest.raises(ConfigError, match="^model.pretrained: must be true or false, got '1'$"):
        checked("model", {"pretrained": 1})


def test_command_line_overrides_of_sweeps_still_compose(compose):
    cfg = compose([SWEEP, "sweep.n_trials=4", "~sweep.seeds", "+sweep.seeds={min: 3, max: 6, min_effect: 0.005}"])
    check_config(cfg)
    assert cfg["sweep"]["n_trials"] == 4 and cfg["sweep"]["seeds"] == {"min": 3, "max": 6, "min_effect": 0.005}
    assert cfg["sweep"]["retry_timeout_s"] == schemas.SweepConfig.retry_timeout_s   # from the schema


# --- as users run it: one line, exit 2, nothing made ------------------------------------------------------------

@pytest.mark.parametrize("args, line", [
    (["train.epochs=true"], "error: train.epochs: must be an integer >= 1, got 'true'"),
    (["data=synthetic", "data.aug.mixup=abc"], "error: data.aug.mixup: must be a number >= 0, got 'abc'"),
    ([SWEEP, "sweep.n_trials=true"], "error: sweep.n_trials: must be an integer >= 1 or null, got 'true'"),
])
def test_cli_wrong_type_is_one_line_exit_2_and_nothing_is_stored(tmp_path, args, line):
    result = subprocess.run([sys.executable, "-m", "pitsearch", *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [line], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []   # no outputs/ (Hydra's run folder), no mlflow.db


# --- the YAML files set only keys the schema knows ---------------------------------------------------------------

def _yaml(path: Path) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(path)) or {}
    node.pop("defaults", None)
    return node


YAML_FILES = [p for p in sorted(CONF_DIR.glob("*/*.yaml")) if p.parent.name != "sweep"] + sorted(
    SWEEPS_DIR.glob("*.yaml"))   # conf/sweep is a link to sweeps/


@pytest.mark.parametrize("path", YAML_FILES,
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_files_set_only_keys_the_schema_knows(path):
    node = _yaml(path)
    group = path.parent.name
    if path.parent == SWEEPS_DIR:
        assert set(node) <= set(schemas.GROUP_SCHEMAS), sorted(node)
        for key, value in node.items():
            checked(key, value if key != "data" else {"name": "mnist5k", **value})
        return
    cfg = checked(group, node)
    if group == "data":
        assert cfg["name"] == path.stem and path.stem in schemas.DATA_SCHEMAS
    if group == "model":
        assert cfg["name"] == path.stem
        assert set(node) >= set(schemas.required_keys(schemas.ModelConfig))


def test_every_sweep_file_composes_and_checks(compose):
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        check_config(compose([f"+sweep={path.stem}"]))


# --- one source of defaults -------------------------------------------------------------------------------------

def test_schema_defaults_are_what_the_code_uses(compose):
    from pitsearch.analysis import load_eval_defaults
    from pitsearch.models import build_model, resolve_model_config
    from pitsearch.search.spec import parse_sweep
    from pitsearch.train import validate_train_config

    composed = compose([])
    train_defaults = schemas.defaults(schemas.TrainConfig)
    assert composed["train"] == train_defaults == validate_train_config({})
    assert composed["tracking"] == schemas.defaults(schemas.TrackingConfig)
    assert composed["eval"] == schemas.defaults(schemas.EvalConfig) == load_eval_defaults()

    # A preset sets its architecture; every other model key is the schema's, down to the built model.
    model_defaults = schemas.defaults(schemas.ModelConfig)
    preset = _yaml(CONF_DIR / "model" / "pit_nano.yaml")
    resolved = resolve_model_config("pit_nano")
    for key, default in model_defaults.items():
        if key not in preset:
            expected = schemas.IMAGENET_SHAPE.get(key, default) if default is None else default
            assert resolved[key] == expected and composed["model"][key] == default, key
    model = build_model("pit_nano")
    block = model.stages[0].blocks[0]
    assert block.mlp.fc1.out_features == model_defaults["mlp_ratio"] * model.channels[0]
    assert model.cls_pos_embed is None and model.num_classes == schemas.IMAGENET_SHAPE["num_classes"]

    spec = parse_sweep({"study_name": "s", "n_trials": 2}, base_dir="/tmp")
    sweep_defaults = schemas.defaults(schemas.SweepConfig)
    assert spec.sampler == sweep_defaults["sampler"] and spec.pruner == sweep_defaults["pruner"]
    assert spec.objectives == [(o["metric"], o["direction"]) for o in sweep_defaults["objectives"]]
    assert (spec.n_workers, spec.trials_per_gpu, spec.retry_timeout_s, spec.heartbeat_interval_s, spec.report) == (
        sweep_defaults["n_workers"], sweep_defaults["trials_per_gpu"], sweep_defaults["retry_timeout_s"],
        sweep_defaults["heartbeat_interval_s"], sweep_defaults["report"])

    for name, schema in schemas.DATA_SCHEMAS.items():
        assert set(compose([f"data={name}"])["data"]) == set(schemas.field_names(schema)), name
