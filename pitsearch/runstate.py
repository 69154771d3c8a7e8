"""How a run ended, in the one vocabulary pitsearch uses, with its name in Optuna's and in MLflow's.

A run is COMPLETE (trained to the end), PRUNED (stopped early on purpose: a pruner, a NaN loss) or FAILED.
Optuna calls these TrialState COMPLETE / PRUNED / FAIL and MLflow run statuses FINISHED / KILLED / FAILED;
every translation between the three goes through this table. Light on purpose: no optuna or mlflow import.
"""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAILED = "FAILED"

    def __str__(self) -> str:   # a tag, a printed line: the bare name on every Python version
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def trial_state_name(self) -> str:
        """The `optuna.trial.TrialState` member's name."""
        return _TRIAL_STATE[self]

    @property
    def trial_state(self):
        from optuna.trial import TrialState

        return TrialState[self.trial_state_name]

    @property
    def mlflow_status(self) -> str:
        """The MLflow run status a run in this state is closed with."""
        return _MLFLOW_STATUS[self]

    @classmethod
    def of_trial(cls, trial_state) -> RunState | None:
        """The state of a finished Optuna trial (a TrialState or its name); None while it runs or waits."""
        name = getattr(trial_state, "name", trial_state)
        return next((state for state, trial_name in _TRIAL_STATE.items() if trial_name == name), None)


class StopRun(Exception):
    """Raised by a callback to end a run early; `state` says how the run ends (e.g. PRUNED)."""

    def __init__(self, reason: str, state: RunState = RunState.PRUNED):
        super().__init__(reason)
        self.reason = reason
        self.state = state


class Diverged(StopRun):
    """The training loss became NaN or infinite."""

    def __init__(self, reason: str):
        super().__init__(reason, state=RunState.PRUNED)


_TRIAL_STATE = {RunState.COMPLETE: "COMPLETE", RunState.PRUNED: "PRUNED", RunState.FAILED: "FAIL"}
_MLFLOW_STATUS = {RunState.COMPLETE: "FINISHED", RunState.PRUNED: "KILLED", RunState.FAILED: "FAILED"}
