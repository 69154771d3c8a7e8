"""The sweep's MLflow parent run: made once per study, found again on resume, closed when the sweep stops; and
the child runs that workers left RUNNING, closed with their trial's state.

On a cluster the machine that created the study creates the parent run; the others wait for its id to appear
in the study's user attributes (`PARENT_RUN_ATTR`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pitsearch.masking import mask_url
from pitsearch.runstate import RunState
from pitsearch.search.storage import storage_label
from pitsearch.tracking import flatten

PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 30.0   # how long a joining machine waits for the study's creator to make the parent run


def ensure_parent_run(study, spec, tracker, cfg: dict[str, Any], created: bool = True) -> str:
    """The study's one parent run: found through the study's user attributes, created if missing.

    Machines starting together: the one that created the study creates the run; the others wait (up to
    PARENT_WAIT_S) for its id to appear. A re-read after writing settles any remaining race.
    """
    import yaml

    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id and not created and not study.get_trials(deepcopy=False):
        deadline = time.monotonic() + PARENT_WAIT_S
        while not run_id and time.monotonic() < deadline:
            time.sleep(0.5)
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id and tracker.run_exists(run_id):
        if tracker.run_status(run_id) != "RUNNING":
            tracker.set_run_status(run_id, "RUNNING")
        return run_id
    run_id = tracker.start_run(run_name=spec.study_name, tags={
        "pitsearch.kind": "sweep", "sweep": spec.study_name, "n_trials": spec.n_trials,
        "objectives": ", ".join(f"{m} ({d})" for m, d in spec.objectives),
        "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
        "storage": storage_label(spec.storage, spec.output_dir),
        "mlflow.note.content": (f"Sweep `{spec.study_name}`: one child run per trial. In the runs table use "
                                "*Group by* on a swept tag (e.g. `model.pool`) to see each variant's mean curve "
                                "over seeds; `summary.md` and the report are this run's artifacts."),
    })
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    time.sleep(0.2)  # another machine may have raced us: the study's value wins, ours is dropped
    winner = study.user_attrs.get(PARENT_RUN_ATTR)  # a fresh read of the storage
    if winner != run_id and winner and tracker.run_exists(winner):
        tracker.delete_run(run_id)
        return winner
    study.set_user_attr("mlflow_tracking_uri", mask_url(tracker.uri))
    study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
    tracker.log_text(run_id, yaml.safe_dump(spec.raw, sort_keys=False), "sweep.yaml")
    tracker.log_json(run_id, spec.space.describe(), "search_space.json")
    tracker.log_text(run_id, yaml.safe_dump({k: v for k, v in cfg.items() if k != "hydra"}, sort_keys=False),
                     "base_config.yaml")
    tracker.log_params(run_id, {f"sweep.{k}": v for k, v in flatten(spec.raw).items()})
    return run_id


def close_orphan_runs(study, tracker, parent_run_id: str, say: Callable[[str], None]) -> None:
    """Every child run still RUNNING whose trial is not running is closed with its trial's state (FAILED when
    the trial did not finish): runs of workers that lost the MLflow server, and runs whose worker was stopped
    (Ctrl-C, SIGKILL) between opening the run and recording it on the trial."""
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    for run_id, tags in tracker.running_children(parent_run_id):
        number = tags.get("trial_number", "")
        trial = trials.get(int(number)) if number.isdigit() else None
        state = RunState.of_trial(trial.state) if trial is not None else None
        if trial is not None and trial.state.name == "RUNNING":
            continue  # a live worker, here or on another machine
        if state in (RunState.COMPLETE, RunState.PRUNED):
            tracker.set_tags(run_id, {"trial_state": trial.state.name})
            tracker.end_run(run_id, status=state.mlflow_status)
            closed = state.mlflow_status
        else:
            reason = (trial.user_attrs.get("fail_reason") if trial is not None else None) or "its trial is not running"
            tracker.fail_run(run_id, reason)
            closed = f"FAILED ({reason})"
        say(f"MLflow run {run_id} (trial {number or '?'}) was left RUNNING: closed as {closed}")


def close_parent(tracker, parent_run_id: str, *, complete: bool, interrupted: bool, running: int) -> None:
    """A complete sweep's parent is FINISHED. An unfinished one is KILLED (resuming sets it RUNNING again),
    unless workers elsewhere are still at it: then it stays RUNNING, and the last machine to finish closes it."""
    if complete and not interrupted:
        tracker.end_run(parent_run_id, status="FINISHED")
    elif not running:
        tracker.end_run(parent_run_id, status="KILLED")
