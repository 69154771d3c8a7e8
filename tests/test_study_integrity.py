"""Nothing a user or a crash does can poison a study: mistakes every trial would hit are one line before the study
exists, failed grid cells run again on resume (a bounded number of times), "complete" means every cell finished,
seeded samplers draw new points when resumed, and a grid grows by seeds."""

from __future__ import annotations

import re

import optuna
import pytest
from optuna.trial import TrialState

from helpers import completed_cells, create_study, load_study, run_cli, states, tiny_sweep, worker_context

optuna.logging.set_verbosity(optuna.logging.ERROR)
NO_MLFLOW = ["sweep.report=false", "tracking.enabled=false"]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- before the study


@pytest.mark.slow
def test_a_mistake_every_trial_would_hit_is_one_line_and_no_study(tmp_path):
    config_dir = tiny_sweep(tmp_path, "heads", seeds="[0]")
    result = run_cli(["--config-dir", config_dir, "+sweep=heads", "model.heads=[1,2]"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: model.heads: has 2 entries"), result.stderr
    assert not (tmp_path / "pitsearch-sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def _run_sweep_in_process(compose, tmp_path, config_dir, name, overrides):
    from pitsearch.report.sweep import StudyReporter
    from pitsearch.search.compose import TrialComposer
    from pitsearch.search.runner import run_sweep

    composer = TrialComposer(extra_search_paths=[str(config_dir)], overrides=[f"+sweep={name}", *overrides])
    return run_sweep(composer.compose(), composer, reporter=StudyReporter())


def test_an_objective_no_trial_reports_is_one_line_before_the_study(compose, tmp_path):
    from pitsearch.errors import ConfigError

    config_dir = tiny_sweep(tmp_path, "typo", seeds="[0]")
    with pytest.raises(ConfigError) as error:
        _run_sweep_in_process(compose, tmp_path, config_dir, "typo",
                              ["sweep.objectives=[{metric: val/acc_bset, direction: maximize}]"])
    assert error.value.field == "sweep.objectives[0].metric"
    assert "'val/acc_bset'" in str(error.value) and "val/acc_best" in str(error.value) and "macs" in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "pitsearch-sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_error_only_some_cells_hit_is_left_to_those_trials(compose):
    from pitsearch.errors import ConfigError
    from pitsearch.search.preflight import check_trial_configs

    # conv pooling needs each stage's channels to be a multiple of the last: 16 -> 24 is not; none is fine
    base = ["data=digits", "model.patch_size=2", "model.stride=1", "model.depths=[1,1,1]", "model.heads=[1,2,3]",
            "model.head_dims=[8,8,8]"]
    check_trial_configs([compose(base + ["model.pool=conv"]), compose(base + ["model.pool=none"])])
    with pytest.raises(ConfigError, match="^model.patch_size: 9 is larger than the 8 px image"):
        check_trial_configs([compose(base + ["model.pool=conv", "model.patch_size=9"]),
                             compose(base + ["model.pool=none", "model.patch_size=9"])])


def test_data_shapes_known_without_loading_match_the_loaded_data(compose):
    from pitsearch.data import load_dataset
    from pitsearch.search.preflight import data_shape

    for name in ("digits", "mnist5k"):
        data = compose([f"data={name}"])["data"]
        shape, loaded = data_shape(data), load_dataset(data)
        assert (shape.img_size, shape.in_chans, shape.num_classes) == (loaded.img_size, loaded.in_chans,
                                                                        loaded.num_classes)
    assert data_shape(compose(["data=digits", "data.img_size=16"])["data"]).img_size == 16


@pytest.mark.parametrize("name", sorted(p.stem for p in __import__("pitsearch.paths").paths.SWEEPS_DIR.glob("*.yaml")))
def test_shipped_sweeps_pass_the_checks_before_the_study(compose, name):
    from pitsearch.search.compose import TrialComposer
    from pitsearch.search.preflight import check_sweep, preflight_configs
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    cfg = compose([f"+sweep={name}"])
    spec = parse_sweep(cfg["sweep"], known_paths=config_paths(cfg))
    # what the runner checks: the examples, and with sweep.match every variant solved (pooling_ablation_matched,
    # pit_vs_vit)
    check_sweep(spec, *preflight_configs(spec, TrialComposer(overrides=[f"+sweep={name}"])))


def test_analysis_metric_names_are_what_run_analyses_reports(compose):
    from pitsearch.analysis import metric_names, run_analyses
    from pitsearch.experiment import prepare

    eval_cfg = {"spatial": True, "robustness": ["occlusion", "fgsm"], "spatial_images": 4, "robustness_images": 8}
    prepared = prepare(compose(["data=digits", "model.patch_size=2", "model.stride=1", "model.depths=[1,1,1]",
                                "model.heads=[1,2,4]", "model.head_dims=[8,8,8]"]))
    reported = run_analyses(prepared.model, prepared.dataset, eval_cfg)["metrics"]
    assert sorted(reported) == sorted(metric_names(eval_cfg))
    assert metric_names(None) == []


# ---------------------------------------------------------------------------------------------- grid bookkeeping


def _grid_study(tmp_path, seeds=(0, 1), name="g"):
    from pitsearch.search.space import parse_space
    from pitsearch.search.storage import make_storage
    from pitsearch.search.study import load_or_create_study, make_pruner, make_sampler

    space = parse_space({"model.pool": {"choices": ["conv", "none"]}}, seeds=list(seeds))
    storage = make_storage(None, tmp_path)
    study = load_or_create_study(name, storage, make_sampler({"name": "grid"}, space, 1), make_pruner(None, 1),
                                 ["maximize"])
    return study, space


def _run(trial, space, study, state=TrialState.COMPLETE, reason=None):
    values = space.suggest(trial, seed_range=True)
    if reason:
        trial.set_user_attr("fail_reason", reason)
    study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    return values


def test_failed_cells_are_retried_by_the_next_run_only_and_at_most_three_times(tmp_path):
    from pitsearch.search.grid import MAX_CELL_ATTEMPTS, grid_state, next_grid_trial, requeue_failed

    study, space = _grid_study(tmp_path, seeds=[0])
    lock = tmp_path / "grid.lock"
    first = _run(next_grid_trial(study, space, 0, 2, lock), space, study, TrialState.FAIL, "boom")
    _run(next_grid_trial(study, space, 0, 2, lock), space, study)
    assert next_grid_trial(study, space, 0, 2, lock) is None   # the failed cell waits for the next run
    for attempt in range(2, MAX_CELL_ATTEMPTS + 1):             # each run retries it once
        assert [t.user_attrs["fail_reason"] for t in requeue_failed(study, space)] == ["boom"]
        assert requeue_failed(study, space) == []                # already queued
        trial = next_grid_trial(study, space, 0, 2, lock)
        assert _run(trial, space, study, TrialState.FAIL, "boom") == first
        assert next_grid_trial(study, space, 0, 2, lock) is None
    assert requeue_failed(study, space) == []                    # given up after MAX_CELL_ATTEMPTS
    state = grid_state(study, space, 0)
    assert state.done == 1 and len(state.failed) == 1 and not state.retryable(state.failed[0])


def test_interrupted_attempts_do_not_count_and_a_racing_copy_never_runs(tmp_path):
    from pitsearch.search.grid import grid_state, next_grid_trial, requeue_failed

    study, space = _grid_study(tmp_path, seeds=[0])
    lock = tmp_path / "grid.lock"
    trial = next_grid_trial(study, space, 0, 2, lock)
    _run(trial, space, study, TrialState.FAIL, "interrupted")
    assert requeue_failed(study, space) and grid_state(study, space, 0).attempts(
        space.cell_key(study.trials[0].params)) == 0
    # Two machines queued the other cell at once: the copy with the higher number is never popped.
    other = {"model.pool": "none", "train.seed": 0} if study.trials[0].params["model.pool"] == "conv" else \
        {"model.pool": "conv", "train.seed": 0}
    study.enqueue_trial(other)
    study.enqueue_trial(other)
    cells = [space.cell_key(_run(next_grid_trial(study, space, 0, 2, lock), space, study)) for _ in range(2)]
    assert len(set(cells)) == 2 and next_grid_trial(study, space, 0, 2, lock) is None
    assert [t.number for t in study.trials if t.state == TrialState.WAITING] == [3]


def test_the_queuer_of_a_racing_copy_closes_it_unrun(tmp_path):
    from pitsearch.search.grid import DUPLICATE, _queue, grid_state, next_grid_trial

    study, space = _grid_study(tmp_path, seeds=[0])
    cell = {"model.pool": "conv", "train.seed": 0}
    study.enqueue_trial(cell)                        # another machine queued it a moment before this one did
    state = _queue(study, space, 0, cell, {})
    assert [t.number for _, t in state.queued] == [0]
    copy = study.trials[1]
    assert copy.state == TrialState.FAIL and copy.user_attrs[DUPLICATE] and "not run" in copy.user_attrs["fail_reason"]
    assert _run(next_grid_trial(study, space, 0, 2, None), space, study) == cell
    state = grid_state(study, space, 0)
    assert state.done == 1 and not state.failed and not state.stale


def test_two_workers_taking_turns_without_a_lock_take_distinct_cells(tmp_path):
    from pitsearch.search.grid import next_grid_trial
    from pitsearch.search.storage import make_storage

    study, space = _grid_study(tmp_path, seeds=[0, 1, 2])
    other = optuna.load_study(study_name="g", storage=make_storage(None, tmp_path))
    # No lock (as on two machines): each sees the other's queued and running cells.
    trials = [next_grid_trial(s, space, 0, 6, None) for s in (study, other) * 3]
    cells = {space.cell_key(space.suggest(t, seed_range=True)) for t in trials}
    assert len(cells) == 6 and next_grid_trial(study, space, 0, 6, None) is None


def test_a_grid_refuses_changes_optuna_cannot_store_before_anything_is_stored(tmp_path):
    from pitsearch.errors import ConfigError
    from pitsearch.search.space import parse_space
    from pitsearch.search.study import check_resumable

    study, space = _grid_study(tmp_path)
    from pitsearch.search.grid import next_grid_trial
    _run(next_grid_trial(study, space, 0, 4, None), space, study)
    check_resumable(study, parse_space({"model.pool": {"choices": ["conv", "none"]}}, seeds=[0, 1, 5]), True, True)
    with pytest.raises(ConfigError, match=r"^sweep.space.model.pool: study 'g' stores model.pool with the choices "
                                          r"\['conv', 'none'\].*use a new sweep.study_name"):
        check_resumable(study, parse_space({"model.pool": {"choices": ["conv", "max"]}}, seeds=[0]), True, True)
    with pytest.raises(ConfigError, match="^sweep.space: study 'g' is a grid over model.pool, train.seed; .*only "
                                          "seeds can be added"):
        check_resumable(study, parse_space({"model.pool": {"choices": ["conv", "none"]},
                                            "train.lr": {"choices": [0.1]}}, seeds=[0]), True, True)
    assert len(study.trials) == 1


def test_a_machine_joining_while_another_is_between_two_suggests_is_not_refused(tmp_path):
    """Seen in CI: machine 2 opened the study while machine 1's first trial had its pool but not yet its seed."""
    from pitsearch.errors import ConfigError
    from pitsearch.search.study import check_resumable

    study, space = _grid_study(tmp_path)
    trial = study.ask()
    trial.suggest_categorical("model.pool", ["conv", "none"])   # train.seed not suggested yet
    check_resumable(study, space, True, True)
    study.tell(trial, 0.5)   # a finished trial without the seed axis is another grid
    with pytest.raises(ConfigError, match="^sweep.space: study 'g' is a grid over model.pool;"):
        check_resumable(study, space, True, True)


# ---------------------------------------------------------------------------------------------- seeded samplers


def test_seeded_samplers_draw_new_points_on_resume_and_the_same_on_a_fresh_run(tmp_path):
    from pitsearch.search.space import parse_space
    from pitsearch.search.storage import make_storage
    from pitsearch.search.study import load_or_create_study, make_pruner, make_sampler

    space = parse_space({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})

    def run(name, n, directory):  # one invocation: a sampler built from the config, n trials
        sampler = make_sampler({"name": "tpe", "seed": 0}, space, 1, study_name=name)
        study = load_or_create_study(name, make_storage(None, directory), sampler, make_pruner(None, 1),
                                     ["maximize"])
        for _ in range(n):
            trial = study.ask()
            study.tell(trial, space.suggest(trial)["train.lr"])
        return [t.params["train.lr"] for t in study.trials]

    first = run("s", 2, tmp_path / "a")
    resumed = run("s", 2, tmp_path / "a")
    assert resumed[:2] == first and len(set(resumed)) == 4
    assert run("s", 4, tmp_path / "b") == resumed   # a fresh run with the same seed draws the same


@pytest.mark.slow
def test_a_resumed_random_sweep_draws_no_configuration_twice(compose, tmp_path):
    from pitsearch.search.worker import run_worker

    config_dir = tiny_sweep(tmp_path, "rand", seeds="[0]", space="    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}")
    for n_trials in (2, 4):   # run, then resume with a larger budget
        cfg, ctx = worker_context(compose, tmp_path, "rand", config_dir,
                                   extra=["sweep.sampler.name=random", "+sweep.sampler.seed=0",
                                          f"sweep.n_trials={n_trials}"])
        create_study(cfg, tmp_path)
        assert run_worker(ctx, emit=lambda line: None)["COMPLETE"] == 2
    study = load_study(tmp_path, "rand")
    lrs = [t.params["train.lr"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(lrs) == 4 and len(set(lrs)) == 4


# ---------------------------------------------------------------------------------------------- CLI: resume


@pytest.mark.slow
def test_a_cell_that_failed_runs_again_when_the_fixed_command_resumes(compose, tmp_path, capsys):
    config_dir = tiny_sweep(tmp_path, "partial", seeds="[0]")   # model.pool in {conv, none}
    # channels 8 -> 16 -> 24: conv pooling cannot (24 is not a multiple of 16), none can
    first = run_cli(["--config-dir", config_dir, "+sweep=partial", "model.heads=[1,2,3]", *NO_MLFLOW], cwd=tmp_path)
    assert first.returncode == 4, first.stderr
    last = _error_lines(first)[-1]
    assert last.startswith("sweep 'partial': 1/2 cells finished, 1 failed: model.pool=conv train.seed=0 (model.pool:"), \
        first.stderr
    assert "Running the same command again retries 1 of them" in last

    capsys.readouterr()
    _run_sweep_in_process(compose, tmp_path, config_dir, "partial", NO_MLFLOW)   # the fixed command, in-process
    second = capsys.readouterr().err
    assert re.search(r"cell model.pool=conv train.seed=0 failed in trial \d \(model.pool: .*\): queued again",
                     second), second
    assert states(load_study(tmp_path, "partial")) == {"COMPLETE": 2, "FAIL": 1}


@pytest.mark.slow
def test_seeds_added_to_a_grid_run_only_the_new_cells_once_with_two_workers(compose, tmp_path):
    from pitsearch.search.worker import run_worker

    config_dir = tiny_sweep(tmp_path, "grow", seeds="[0]")   # model.pool in {conv, none}: 2 cells, run in-process
    cfg, ctx = worker_context(compose, tmp_path, "grow", config_dir)
    create_study(cfg, tmp_path)
    assert run_worker(ctx, emit=lambda line: None)["COMPLETE"] == 2
    before = {t.number: t.params for t in load_study(tmp_path, "grow").trials}

    config_dir = tiny_sweep(tmp_path, "grow", seeds="[0, 1, 2]", workers=2)   # 4 more cells, 2 worker processes
    grown = run_cli(["--config-dir", config_dir, "+sweep=grow", *NO_MLFLOW], cwd=tmp_path, check=True)
    study = load_study(tmp_path, "grow")
    assert states(study) == {"COMPLETE": 6}, grown.stderr
    assert set(completed_cells(study).values()) == {1} and len(completed_cells(study)) == 6
    assert {t.number: t.params for t in study.trials if t.number in before} == before   # kept, not re-run
    assert len({t.user_attrs["worker"] for t in study.trials if t.number not in before}) == 2   # both workers ran
