"""Sampler/pruner/storage/study factories, the global budget and stale-trial cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from pitsearch.errors import ConfigError
from pitsearch.search.space import parse_space
from pitsearch.masking import mask_url
from pitsearch.search.grid import grid_state, requeue_failed
from pitsearch.search.storage import make_storage
from pitsearch.search.study import load_or_create_study, make_pruner, make_sampler, parse_objectives
from pitsearch.search.trials import count_finished, fail_stale_running, mark_worker, tell, worker_id

optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture(scope="module")
def grid_space():
    # 2 x 4 = 8 cells
    return parse_space({"model.pool": {"choices": ["conv", "max"]}}, seeds=[0, 1, 2, 3])


@pytest.fixture(scope="module")
def range_space():
    return parse_space({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})


def _study(storage, sampler=None, name="s", directions=("maximize",)):
    sampler = sampler or optuna.samplers.RandomSampler(seed=0)
    return load_or_create_study(name, storage, sampler, optuna.pruners.NopPruner(), list(directions))


# ---------------------------------------------------------------------------------------------- sampler, pruner


def test_make_sampler_by_name(grid_space, range_space):
    assert isinstance(make_sampler({"name": "grid"}, grid_space, 1), optuna.samplers.GridSampler)
    tpe = make_sampler({"name": "tpe", "n_startup_trials": 3, "seed": 5}, range_space, 1)
    # A seeded sampler draws each trial with a seed of its own (TrialSeededSampler); `base` is the one built.
    assert isinstance(tpe.base, optuna.samplers.TPESampler) and tpe.base._n_startup_trials == 3
    assert isinstance(make_sampler({"name": "random"}, range_space, 2), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler({"name": "nsga2", "population_size": 8}, grid_space, 2),
                      optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler({"name": "bruteforce"}, grid_space, 1), optuna.samplers.BruteForceSampler)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"name": "cmaes"}, "sweep.sampler.name: unknown 'cmaes'; valid: grid, tpe, random, nsga2, gp, bruteforce"),
        ({"name": "tpe", "n_startup": 3}, "sweep.sampler.n_startup: not an argument of TPESampler; valid: "),
        ({"name": "tpe", "consider_prior": True}, "sweep.sampler.consider_prior: deprecated in Optuna 5"),
        ({"name": "grid", "search_space": {}}, "sweep.sampler.search_space: set by pitsearch"),
        ({"name": "random", "seed": "x"}, "sweep.sampler.seed: must be an integer or null"),
        ({"name": "nsga2", "population_size": 1}, "sweep.sampler: NSGAIISampler: "),
        ({"name": "grid"}, "sweep.sampler: grid needs categorical, unconditional parameters"),
        ({"name": "bruteforce"}, "sweep.space.train.lr: bruteforce needs a step for float ranges"),
    ],
)
def test_make_sampler_errors(range_space, cfg, message):
    with pytest.raises(ConfigError) as err:
        make_sampler(cfg, range_space, 1)
    assert str(err.value).startswith(message), str(err.value)


def test_make_pruner():
    assert isinstance(make_pruner({"name": "none"}, 2), optuna.pruners.NopPruner)
    assert isinstance(make_pruner(None, 1), optuna.pruners.NopPruner)
    median = make_pruner({"name": "median", "n_warmup_steps": 3}, 1)
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_warmup_steps == 3
    assert isinstance(make_pruner({"name": "percentile", "percentile": 25.0}, 1), optuna.pruners.PercentilePruner)
    for name in ("hyperband", "successive_halving"):
        assert isinstance(make_pruner({"name": name}, 1), optuna.pruners.BasePruner)
    assert isinstance(make_pruner({"name": "threshold", "lower": 0.1}, 1), optuna.pruners.ThresholdPruner)


@pytest.mark.parametrize(
    "cfg, n_obj, message",
    [
        ({"name": "asha"}, 1, "sweep.pruner.name: unknown 'asha'; valid: none, median, percentile, hyperband"),
        ({"name": "median", "warmup": 3}, 1, "sweep.pruner.warmup: not an argument of MedianPruner"),
        ({"name": "percentile"}, 1, "sweep.pruner.percentile: required by PercentilePruner"),
        ({"name": "percentile", "percentile": 120}, 1, "sweep.pruner: PercentilePruner: "),
        ({"name": "median"}, 2, "sweep.pruner: pruning needs a single objective"),
    ],
)
def test_make_pruner_errors(cfg, n_obj, message):
    with pytest.raises(ConfigError) as err:
        make_pruner(cfg, n_obj)
    assert str(err.value).startswith(message), str(err.value)


def test_parse_objectives():
    assert parse_objectives([{"metric": "val/acc_best", "direction": "maximize"},
                             {"metric": "macs", "direction": "minimize"}]) == [
        ("val/acc_best", "maximize"), ("macs", "minimize")]
    for node, message in [
        ([], "sweep.objectives: must be a non-empty list"),
        ([{"metric": "a", "direction": "max"}], "sweep.objectives[0].direction: must be one of maximize, minimize"),
        ([{"metric": "a", "direction": "maximize", "goal": 1}], "sweep.objectives[0].goal: unknown key"),
        ([{"direction": "maximize"}], "sweep.objectives[0].metric: must be a non-empty string"),
        ([{"metric": "a", "direction": "maximize"}] * 2, "sweep.objectives[1].metric: a is listed twice"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_objectives(node)
        assert str(err.value).startswith(message), str(err.value)


# ---------------------------------------------------------------------------------------------- storage


def test_default_journal_storage(tmp_path):
    out = tmp_path / "sweeps" / "run1"
    storage = make_storage(None, out)
    assert isinstance(storage, JournalStorage)
    assert _journal_file(storage) == out / "optuna-journal.log" and _journal_file(storage).exists()


def _journal_file(storage) -> Path:
    """The file behind a journal storage (Optuna's private attribute: only a test needs it)."""
    return Path(storage._backend._file_path)


def test_journal_path_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = make_storage("studies/x.journal", Path("unused"))
    assert _journal_file(storage) == tmp_path / "studies" / "x.journal"
    assert isinstance(make_storage(str(tmp_path / "y.jsonl"), tmp_path), JournalStorage)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_sqlite_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = make_storage("sqlite:///db/optuna.db", tmp_path)
    assert isinstance(storage, RDBStorage)
    assert storage.url == f"sqlite:///{tmp_path}/db/optuna.db"
    assert storage.heartbeat_interval == 60 and storage.engine_kwargs["connect_args"]["timeout"] == 60
    study = _study(storage)
    study.tell(study.ask(), 1.0)
    assert count_finished(study) == 1 and (tmp_path / "db" / "optuna.db").exists()
    assert make_storage(f"sqlite:///{tmp_path}/b.db", tmp_path, heartbeat_interval=None).heartbeat_interval is None


@pytest.mark.parametrize("value, message", [
    ("optuna.db", "sweep.storage: 'optuna.db' is neither a journal file"),
    ("redis://u:secret@host/0", "sweep.storage: unsupported URL scheme 'redis' in redis://u:***@host/0"),
    ("sqlite:///:memory:", "sweep.storage: sqlite:///:memory: is not a persistent sqlite file URL"),
])
def test_storage_errors(tmp_path, value, message):
    with pytest.raises(ConfigError) as err:
        make_storage(value, tmp_path)
    assert str(err.value).startswith(message) and "secret" not in str(err.value), str(err.value)


def test_mask_url():
    assert mask_url("postgresql://alice:s3cr@t@db.example:5432/optuna") == "postgresql://alice:***@db.example:5432/optuna"
    assert mask_url("postgresql+psycopg://bob@db/optuna") == "postgresql+psycopg://bob@db/optuna"
    assert mask_url("mysql://u:p@h/db?password=x&charset=utf8") == "mysql://u:***@h/db?password=***&charset=utf8"
    assert mask_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert mask_url("sqlite:///rel.db") == "sqlite:///rel.db"
    assert mask_url("postgresql://u:pw@h/db#x") == "postgresql://u:***@h/db#x"


def test_existing_study_with_other_directions(tmp_path):
    storage = make_storage(None, tmp_path)
    _study(storage, name="s1", directions=["maximize"])
    assert _study(storage, name="s1", directions=["maximize"]).study_name == "s1"
    with pytest.raises(ConfigError, match=r"^sweep.objectives: study 's1' already exists with directions \['maximize'\]"):
        _study(storage, name="s1", directions=["maximize", "minimize"])


# ---------------------------------------------------------------------------------------------- grid + budget


def test_grid_two_workers_same_seed_ask_distinct_cells(tmp_path, grid_space):
    path = tmp_path / "j.log"
    workers = [_study(make_storage(str(path), tmp_path),
                      make_sampler({"name": "grid", "seed": 7}, grid_space, 1)) for i in range(2)]
    trials = [workers[i % 2].ask() for i in range(8)]  # interleaved, none finished yet
    cells = {grid_space.cell_key(grid_space.suggest(t)) for t in trials}
    assert len(cells) == 8 == grid_space.grid_size
    for i, t in enumerate(trials[:-1]):
        workers[i % 2].tell(t, float(i))
    with pytest.raises(RuntimeError, match="Study.stop"):  # GridSampler stops after the last cell's tell
        workers[1].tell(trials[-1], 7.0)
    assert count_finished(workers[0]) == 8 and grid_state(workers[1], grid_space, 7).done == 8


def test_tell_swallows_only_the_grid_stop(tmp_path):
    space = parse_space({"a": {"choices": [1, 2]}})
    study = _study(make_storage(None, tmp_path), make_sampler({"name": "grid"}, space, 1))
    trials = [study.ask() for _ in range(2)]
    for t in trials:
        space.suggest(t)
    assert tell(study, trials[0], 1.0).state == TrialState.COMPLETE
    assert tell(study, trials[1], 2.0).state == TrialState.COMPLETE  # study.tell would raise here
    with pytest.raises(ValueError, match="Cannot tell a COMPLETE trial"):
        tell(study, trials[0], 1.0)


def test_budget_counts_complete_and_pruned(tmp_path, range_space):
    study = _study(make_storage(None, tmp_path))
    states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    for s in states:
        t = study.ask()
        range_space.suggest(t)
        study.tell(t, 0.5 if s == TrialState.COMPLETE else None, state=s)
    study.ask()  # running
    assert count_finished(study) == 3


# ---------------------------------------------------------------------------------------------- stale trials


def test_fail_stale_running_dead_vs_live_pid(tmp_path, grid_space):
    study = _study(make_storage(None, tmp_path), make_sampler({"name": "grid"}, grid_space, 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited and reaped: no such process now
    host = worker_id().rpartition(":")[0]
    t_dead, t_live, t_foreign = study.ask(), study.ask(), study.ask()
    for t in (t_dead, t_live, t_foreign):
        grid_space.suggest(t)
    t_dead.set_user_attr("worker", f"{host}:{dead_pid}")
    mark_worker(t_live)
    t_foreign.set_user_attr("worker", "other-host:1")

    assert [t.number for t in fail_stale_running(study)] == [t_dead.number]
    trials = study.get_trials()
    assert trials[t_dead.number].state == TrialState.FAIL
    assert trials[t_dead.number].user_attrs["fail_reason"] == f"worker {dead_pid} died"
    assert trials[t_live.number].state == trials[t_foreign.number].state == TrialState.RUNNING
    assert trials[t_live.number].user_attrs["worker"] == f"{host}:{os.getpid()}"

    # The dead worker's cell is re-queued: the next ask gets the same params and grid cell (GridSampler
    # alone counts FAIL as visited and would never run it again).
    retry = study.ask()
    assert grid_space.suggest(retry) == grid_space.decode(t_dead.params)
    frozen = study.get_trials()[retry.number]
    assert frozen.system_attrs["grid_id"] == trials[t_dead.number].system_attrs["grid_id"]
    assert frozen.system_attrs["retry_history"] == [t_dead.number] and "worker" not in frozen.user_attrs
    assert frozen.user_attrs["retry_of"] == t_dead.number

    # other hosts: only with an age limit; a live local pid is never touched
    failed = fail_stale_running(study, older_than_s=0.0, max_retry=0)
    assert [t.number for t in failed] == [t_foreign.number, retry.number]
    assert study.get_trials()[t_live.number].state == TrialState.RUNNING
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_requeue_failed_once_and_only_undone_cells(tmp_path):
    space = parse_space({"a": {"choices": [1, 2, 3]}})
    study = _study(make_storage(None, tmp_path))
    for a, state in [(1, TrialState.FAIL), (2, TrialState.FAIL), (2, TrialState.COMPLETE)]:
        study.enqueue_trial({"a": a})
        t = study.ask()
        space.suggest(t)
        study.tell(t, 1.0 if state == TrialState.COMPLETE else None, state=state)
    assert [t.number for t in requeue_failed(study, space)] == [0]  # cell a=2 is done
    assert requeue_failed(study, space) == []  # already queued
    assert space.suggest(study.ask()) == {"a": 1}
