"""The sweep.space grammar: validation errors, suggest/decode round trips, grid, Hydra overrides."""

from __future__ import annotations

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from pitsearch.errors import ConfigError
from pitsearch.search.overrides import hydra_value
from pitsearch.search.space import SEED_PATH, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE_YAML = """
model.pool: {choices: [conv, max, avg, none]}
model.depths: {choices: [[1, 2, 1], [2, 2, 2]]}
train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
model.heads_base: {low: 1, high: 4, step: 1}
model.pool_kernel: {choices: [3, 5], when: "model.pool != none"}
"""


@pytest.fixture(scope="module")
def space():
    return parse_space(OmegaConf.create(SPACE_YAML), seeds=OmegaConf.create([0, 1, 2]))


@pytest.fixture(scope="module")
def parser():
    return OverridesParser.create()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"train.lr": {"low": 0.1, "high": 0.01}}, "sweep.space.train.lr: low must be < high"),
        ({"model.pool": {"choices": []}}, "sweep.space.model.pool: choices must be a non-empty list"),
        ({"model.pool": {"choices": "conv"}}, "sweep.space.model.pool: choices must be a non-empty list"),
        ({"x": {"lowx": 1}}, "sweep.space.x.lowx: unknown key; valid: choices, low, high, step, log, type, when"),
        ({"train.lr": {"low": 0.0, "high": 1.0, "log": True}}, "sweep.space.train.lr: log needs low > 0"),
        ({"train.lr": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}},
         "sweep.space.train.lr: step cannot be combined with log"),
        ({"train.lr": {"low": 0.0, "high": 1.0, "step": 0.3}}, "sweep.space.train.lr.step: high - low"),
        ({"train.lr": {"low": "1e-4", "high": 1.0}}, "sweep.space.train.lr.low: must be a number"),
        ({"train.lr": {"low": 1}}, "sweep.space.train.lr: needs either choices or both low and high"),
        ({"a": {"low": 1.5, "high": 3, "type": "int"}}, "sweep.space.a.low: must be an integer for type int"),
        ({"a": {"low": 1, "high": 3, "type": "complex"}}, "sweep.space.a.type: must be int or float"),
        ({"a": {"choices": [1], "low": 0}}, "sweep.space.a.low: not allowed with choices"),
        ({"a": {"choices": [1, 1]}}, "sweep.space.a: choices contain 1 twice"),
        ({"a": {"choices": ["[1, 2]", [1, 2]]}}, "sweep.space.a: a string choice equals the encoding"),
        ({"a": [1, 2]}, "sweep.space.a: expected a mapping like"),
        ({"bad key": {"choices": [1]}}, "sweep.space.bad key: not a config path"),
        ({"b": {"choices": [1], "when": "a == 1"}}, "sweep.space.b.when: a is not a parameter defined earlier"),
        ({"b": {"choices": [1], "when": "b == 1"}, "a": {"choices": [1]}},
         "sweep.space.b.when: b is not a parameter defined earlier"),
        ({"a": {"choices": [1, 2]}, "b": {"choices": [1], "when": "a ~ 1"}}, "sweep.space.b.when: cannot parse"),
        ({"a": {"choices": [1, 2]}, "b": {"choices": [1], "when": "a in 1"}}, "sweep.space.b.when: 'in' needs a list"),
        ({"a": {"choices": [1, 2]}, "b": {"choices": [1], "when": "a == 3"}},
         "sweep.space.b.when: 3 is not one of the choices of a"),
        ({"a": {"low": 0.0, "high": 1.0}, "b": {"choices": [1], "when": "a == 0.5"}},
         "sweep.space.b.when: a is a range"),
        ({SEED_PATH: {"choices": [1]}}, "sweep.space.train.seed: given both here and as sweep.seeds"),
    ],
)
def test_parse_errors_name_the_key(spec, message):
    seeds = [0] if SEED_PATH in spec else None
    with pytest.raises(ConfigError) as err:
        parse_space(spec, seeds=seeds)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize("seeds, message", [([], "non-empty"), ([0, "a"], "not an integer"), ([1, 1], "duplicates")])
def test_seed_errors(seeds, message):
    with pytest.raises(ConfigError, match=f"^sweep.seeds: .*{message}"):
        parse_space({}, seeds=seeds)


def test_known_paths_set_or_callable():
    spec = {"model.pool": {"choices": ["conv"]}}
    parse_space(spec, seeds=[0], known_paths=["model", "model.pool", "train.seed"])
    with pytest.raises(ConfigError, match=r"^sweep.space.model.pool: unknown parameter path$"):
        parse_space(spec, known_paths=lambda p: False)
    with pytest.raises(ConfigError, match=r"^sweep.space.model.pool: unknown parameter path$"):
        parse_space(spec, known_paths={"model.pooling"})
    with pytest.raises(ConfigError, match=r"^sweep.seeds: train.seed is not in the composed config"):
        parse_space(spec, seeds=[0], known_paths={"model.pool"})


def test_range_kinds(space):
    lr, heads = space.params[2], space.params[3]
    assert (lr.kind, lr.log, lr.low, lr.high) == ("float", True, 1e-4, 3e-3)
    assert (heads.kind, heads.step, heads.low, heads.high) == ("int", 1, 1, 4)
    forced = parse_space({"a": {"low": 1, "high": 3, "type": "float"}}).params[0]
    assert forced.kind == "float" and isinstance(forced.low, float)
    assert space.names[-1] == SEED_PATH


def test_suggest_fixed_trial_decodes_lists_and_skips_conditions(space):
    stored = {"model.pool": "none", "model.depths": "[2, 2, 2]", "train.lr": 1e-3, "model.heads_base": 3,
              SEED_PATH: 1}
    values = space.suggest(optuna.trial.FixedTrial(stored))
    assert values == {"model.pool": "none", "model.depths": [2, 2, 2], "train.lr": 1e-3, "model.heads_base": 3,
                      SEED_PATH: 1}
    assert space.encode(values) == stored
    assert space.decode(stored) == values


def test_suggest_on_a_study_round_trips_through_decode(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_pools, seen_depths = set(), set()
    for _ in range(40):
        trial = study.ask()
        values = space.suggest(trial)
        assert space.decode(trial.params) == values
        assert ("model.pool_kernel" in values) == (values["model.pool"] != "none")
        assert 1e-4 <= values["train.lr"] <= 3e-3 and values["model.heads_base"] in (1, 2, 3, 4)
        seen_pools.add(values["model.pool"])
        seen_depths.add(tuple(values["model.depths"]))
        study.tell(trial, 0.0)
    assert seen_pools == {"conv", "max", "avg", "none"} and seen_depths == {(1, 2, 1), (2, 2, 2)}
    # the stored trials decode back to real values too
    assert all(isinstance(space.decode(t.params)["model.depths"], list) for t in study.trials)


def test_in_condition_and_conditional_grid_size():
    s = parse_space({"a": {"choices": ["x", "y", "z"]}, "b": {"choices": [1, 2], "when": "a in [x, y]"},
                     "c": {"choices": [True, False], "when": "b == 2"}})
    cells = list(s.iter_cells())
    # x,y each: b=1 (1) + b=2 (x2 c) = 3; z: 1
    assert s.grid_size == len(cells) == 7
    assert {"a": "z"} in cells
    with pytest.raises(ConfigError, match="^sweep.sampler: grid needs categorical, unconditional parameters"):
        s.grid()


def test_grid_is_cartesian_product_with_seeds():
    s = parse_space({"model.pool": {"choices": ["conv", "max"]}, "model.depths": {"choices": [[1, 2], [2, 2]]}},
                    seeds=[0, 1, 2])
    grid = s.grid()
    assert grid == {"model.pool": ["conv", "max"], "model.depths": ["[1, 2]", "[2, 2]"], SEED_PATH: [0, 1, 2]}
    assert s.grid_size == 12
    sampler = optuna.samplers.GridSampler(grid, seed=0)
    study = optuna.create_study(sampler=sampler)
    cells = {s.cell_key(s.suggest(study.ask())) for _ in range(12)}
    assert len(cells) == 12
    with pytest.raises(ConfigError, match="^sweep.sampler: grid needs"):
        parse_space({"train.lr": {"low": 0.1, "high": 1.0}}).grid()
    assert parse_space({"train.lr": {"low": 0.1, "high": 1.0}}).grid_size is None


def test_overrides_parse_back_in_hydra(space, parser):
    values = {"model.pool": "conv", "model.depths": [1, 2, 1], "train.lr": 0.001, "model.heads_base": 2,
              "model.pool_kernel": 3, SEED_PATH: 0}
    overrides = space.to_overrides(values)
    assert overrides[:3] == ["model.pool=conv", "model.depths=[1,2,1]", "train.lr=0.001"]
    parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(overrides)}
    assert parsed == values


@pytest.mark.parametrize("value", ["none", "null", "true", "3", "1e-3", "a b", "a,b", "it's", "x=y", "back\\",
                                   "q\\'", "", "${model.dim}", "conv-1", "/tmp/x", None, True, False, 0, -3,
                                   1e-5, 2.5, float("inf"), [1, [2, "a b"]], {"k": [1, None]}])
def test_hydra_value_round_trips(parser, value):
    parsed = parser.parse_overrides([f"a={hydra_value(value)}"])[0].value()
    assert parsed == value and type(parsed) is type(value)


def test_choices_are_checked_against_hydra_up_front():
    s = parse_space({"a": {"choices": ["null", "a b", [1, 2], {"k": "v"}]}})
    assert s.params[0].encoded_choices == ["null", "a b", "[1, 2]", '{"k": "v"}']


def test_variant_key_drops_the_seed(space):
    a = {"model.pool": "conv", "model.depths": [1, 2, 1], SEED_PATH: 0}
    b = {SEED_PATH: 2, "model.depths": [1, 2, 1], "model.pool": "conv"}
    assert space.variant_key(a) == space.variant_key(b) == "model.pool=conv model.depths=[1,2,1]"
    assert space.variant_key({SEED_PATH: 1}) == "default"


def test_example_overrides_cover_every_value_and_compose_in_hydra(space, parser):
    rows = space.example_values()
    for p in space.params:
        used = [row[p.path] for row in rows if p.path in row]
        assert all(v in used for v in p.probe_values), p.path
    assert all(("model.pool_kernel" in row) == (row["model.pool"] != "none") for row in rows)
    assert len(rows) <= 5
    for overrides in space.example_overrides():
        assert {o.key_or_group for o in parser.parse_overrides(overrides)} <= set(space.names)
    # a value only reachable behind a condition the diagonal rows miss
    deep = parse_space({"a": {"choices": [1, 2, 3]}, "b": {"choices": ["x", "y", "z"], "when": "a == 3"}})
    assert {row.get("b") for row in deep.example_values()} >= {"x", "y", "z"}
    assert parse_space({}).example_overrides() == [[]]
