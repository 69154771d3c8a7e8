"""Every MLflow call pitsearch makes: runs, batched metrics, params, tags, artifacts.

Runs are addressed by id through `MlflowClient`, never through mlflow's thread-local "active run", so a sweep
parent created in one process can receive children from worker processes and threads. Metrics of one epoch go
out in one `log_batch` call: against a tracking server a single `log_metric` costs ~48 ms.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from pitsearch.errors import ConfigError

# MLflow's hard limits: 100 params / 1000 metrics per log_batch, 6000 chars per param value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_MAX = 6000


def resolve_tracking_uri(uri: str | None, base_dir: str | Path | None = None) -> str:
    """`None` -> an absolute sqlite URI in `base_dir` (default: the working directory).

    Relative sqlite paths are made absolute because Hydra may change the working directory and MLflow >= 3.13
    refuses plain-folder stores.
    """
    base = Path(base_dir or os.getcwd()).resolve()
    if uri is None or str(uri).strip() == "":
        return f"sqlite:///{base / 'mlflow.db'}"
    uri = str(uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{(base / path).resolve()}"
        return uri
    if "://" not in uri:
        raise ConfigError("tracking.uri", f"{uri!r} is not a URI; use sqlite:///<path>, http(s)://host:port or a database URL "
                          "(MLflow no longer accepts plain folders)")
    return uri


def default_artifact_location(tracking_uri: str, configured: str | None) -> str | None:
    if configured:
        return Path(configured).resolve().as_uri() if "://" not in configured else configured
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None  # a server decides


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                out.update(flatten(value, path))
            else:
                out[path] = value
    else:
        out[prefix] = node
    return out


class Tracker:
    """One MLflow store and experiment; creates runs and logs to them by id."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment_id(experiment, artifact_location)

    @classmethod
    def from_config(cls, tracking_cfg: Mapping[str, Any], base_dir: str | Path | None = None) -> "Tracker":
        uri = resolve_tracking_uri(tracking_cfg.get("uri"), base_dir)
        artifacts = default_artifact_location(uri, tracking_cfg.get("artifact_location"))
        return cls(uri, tracking_cfg.get("experiment") or "pitsearch", artifacts)

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another process created it between our lookup and create
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    # -- runs -----------------------------------------------------------------------------------------------
    def start_run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
                  parent_run_id: str | None = None) -> str:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def run_url(self, run_id: str) -> str:
        """What to open in `mlflow ui`: the run page, with the classic (non-GenAI) view selected."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    # -- logging --------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items, synchronous=True)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=2, default=str), artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            figure.savefig(path, dpi=110, bbox_inches="tight")
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= _PARAM_VALUE_MAX else text[:_PARAM_VALUE_MAX - 3] + "..."
