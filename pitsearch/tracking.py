"""Every MLflow call pitsearch makes: runs, batched metrics, params, tags, artifacts.

Runs are addressed by id through `MlflowClient`, never through mlflow's thread-local "active run", so a sweep
parent created in one process can receive children from worker processes and threads. Metrics of one epoch go
out in one `log_batch` call: against a tracking server a single `log_metric` costs ~48 ms.

Each call waits out a lost server (connection refused / reset, 429 / 502 / 503 / 504) with exponential backoff
for `retry_timeout_s` (pitsearch.retry), so a server restart loses no metric; after that it raises
`ServiceUnavailable`. Passwords are masked in every param, tag and text artifact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from pitsearch.errors import ConfigError
from pitsearch.masking import mask_secrets, mask_url
from pitsearch.retry import DEFAULT_TIMEOUT_S, ServiceUnavailable, error_chain, retry_call, sigint_deferred
from pitsearch.runstate import RunState
from pitsearch.tracking_store import open_store
from pitsearch.urls import sqlite_path, with_sqlite_path

T = TypeVar("T")
SERVICE = "MLflow tracking server"
_RETRY_STATUSES = (429, 502, 503, 504)

# MLflow's hard limits: 100 params / 1000 metrics per log_batch, 6000 chars per param value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_MAX = 6000

# MLflow 3.17's UI opens an experiment's pages in the GenAI view unless the URL asks for Model training; this
# query (inside the `#/...` route) selects it, measured with MLflow 3.17.2 on run and artifact pages alike.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def resolve_tracking_uri(uri: str | None, base_dir: str | Path | None = None) -> str:
    """`None` -> an absolute sqlite URI in `base_dir` (default: the working directory).

    Relative sqlite paths are made absolute because Hydra may change the working directory and MLflow >= 3.13
    refuses plain-folder stores.
    """
    base = Path(base_dir or os.getcwd()).resolve()
    if uri is None or str(uri).strip() == "":
        return f"sqlite:///{base / 'mlflow.db'}"
    uri = str(uri)
    path = sqlite_path(uri)
    if path is not None:
        return with_sqlite_path(uri, (base / path).resolve()) if not path.is_absolute() else uri
    check_tracking_uri(uri)
    return uri


# Stores MLflow's tracking client opens (its TrackingStoreRegistry), minus `file:` (MLflow >= 3.13 refuses
# folder stores); a database URL may name its driver (postgresql+psycopg://). Checked up front, because MLflow
# itself only objects once the data is loaded and the model built.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
_URI_HELP = ("use sqlite:///<path>, http(s)://host:port, a database URL (postgresql://, mysql://, mssql://) "
             "or databricks")


def check_tracking_uri(uri: str) -> None:
    """Raise ConfigError (`tracking.uri`, the URI masked) unless MLflow can track to `uri`."""
    uri = str(uri)
    if uri == "databricks" or uri.startswith("databricks://"):   # `databricks` alone: the default profile
        return
    if "://" not in uri:   # masked as if it had a scheme: `user:password@host` forgot its http://
        shown = mask_url(f"x://{uri}")[len("x://"):]
        raise ConfigError("tracking.uri", f"{shown!r} is not a URI; {_URI_HELP} "
                                          "(MLflow no longer accepts plain folders)")
    scheme = uri.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] in TRACKING_SCHEMES or scheme in _plugin_schemes():
        return
    folder = " (MLflow no longer accepts folder stores)" if scheme == "file" else ""
    raise ConfigError("tracking.uri", f"{mask_url(uri)!r}: unsupported scheme {scheme!r}{folder}; {_URI_HELP}")


def _plugin_schemes() -> set[str]:
    """Schemes of installed MLflow tracking-store plugins (entry points; read only for an unknown scheme)."""
    from importlib.metadata import entry_points

    return {entry.name.lower() for entry in entry_points(group="mlflow.tracking_store")}


def default_artifact_location(tracking_uri: str, configured: str | None) -> str | None:
    if configured:
        return Path(configured).resolve().as_uri() if "://" not in configured else configured
    path = sqlite_path(tracking_uri)
    if path is not None:
        return (path.parent / "mlartifacts").as_uri()
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

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None,
                 retry_timeout_s: float = DEFAULT_TIMEOUT_S):
        from mlflow.tracking import MlflowClient

        if uri.startswith(("http://", "https://")):
            # MLflow's own HTTP retries would wait ~4 minutes per call; pitsearch.retry bounds the wait instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            # Ending a run would print "View run ... at <uri>" (the password included) after one more request.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            if mask_url(uri) != uri:
                os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri = uri
        self.retry_timeout_s = retry_timeout_s
        self._down: ServiceUnavailable | None = None

        def first_call() -> str:
            # The client creates or opens the store as it is made: a local sqlite file is created under a lock,
            # made again when a killed first run left it half-made, and refused in one line when unusable.
            self.client = MlflowClient(tracking_uri=uri)
            return self._experiment_id(experiment, artifact_location)

        self.experiment_id = open_store(uri, first_call)

    @classmethod
    def from_config(cls, tracking_cfg: Mapping[str, Any], base_dir: str | Path | None = None,
                    retry_timeout_s: float = DEFAULT_TIMEOUT_S) -> "Tracker":
        uri = resolve_tracking_uri(tracking_cfg.get("uri"), base_dir)
        artifacts = default_artifact_location(uri, tracking_cfg.get("artifact_location"))
        return cls(uri, tracking_cfg.get("experiment") or "pitsearch", artifacts, retry_timeout_s=retry_timeout_s)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` against the store, retried on connection loss. Once a call has given up, the
        next ones try once without waiting (until one succeeds), so a failing trial is wound up quickly."""
        if self._down is not None:
            try:
                with sigint_deferred():
                    result = fn(*args, **kwargs)
            except Exception as error:
                if is_transient_mlflow_error(error):
                    raise ServiceUnavailable(SERVICE, self.uri, self._down.waited_s, error) from error
                raise
            self._down = None
            return result
        try:
            return retry_call(fn, *args, **kwargs, service=SERVICE, target=self.uri,
                              is_transient=is_transient_mlflow_error, timeout_s=self.retry_timeout_s)
        except ServiceUnavailable as error:
            self._down = error
            raise

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self._call(self.client.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        try:
            return self._call(self.client.create_experiment, name, artifact_location=artifact_location)
        except MlflowException:  # another process created it between our lookup and create
            found = self._call(self.client.get_experiment_by_name, name)
            if found is None:
                raise
            return found.experiment_id

    # -- runs -----------------------------------------------------------------------------------------------
    def start_run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
                  parent_run_id: str | None = None) -> str:
        token = uuid.uuid4().hex
        all_tags = {k: mask_url(v) for k, v in (tags or {}).items()}
        all_tags["pitsearch.run_token"] = token
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        attempts = []

        def create() -> str:
            if attempts:  # the previous attempt may have created the run before the connection dropped
                found = self.client.search_runs([self.experiment_id], f"tags.`pitsearch.run_token` = '{token}'",
                                                max_results=1)
                if found:
                    return found[0].info.run_id
            attempts.append(1)
            return self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id

        return self._call(create)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status=status)

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a trial's run as FAILED, with the tags the UI groups and filters by."""
        failed = RunState.FAILED
        self.set_tags(run_id, {"state": failed.value, "trial_state": failed.trial_state_name,
                               "reason": str(reason)[:5000]})
        self.end_run(run_id, status=failed.mlflow_status)

    def set_run_status(self, run_id: str, status: str) -> None:
        self._call(self.client.update_run, run_id, status=status)

    def delete_run(self, run_id: str) -> None:
        self._call(self.client.delete_run, run_id)

    def run_status(self, run_id: str) -> str:
        return self._call(self.client.get_run, run_id).info.status

    def run_exists(self, run_id: str) -> bool:
        """True for an active (not deleted) run."""
        from mlflow.exceptions import MlflowException

        try:
            return self._call(self.client.get_run, run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def running_children(self, parent_run_id: str) -> list[tuple[str, dict[str, str]]]:
        """(run id, tags) of the parent's child runs still marked RUNNING."""
        runs = self._call(self.client.search_runs, [self.experiment_id],
                          f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
                          max_results=1000)
        return [(run.info.run_id, dict(run.data.tags)) for run in runs]

    def run_url(self, run_id: str) -> str:
        """What to open in `mlflow ui`: the run page, in the Model-training (non-GenAI) view."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"

    def artifact_url(self, run_id: str, artifact_path: str) -> str:
        """What to open in `mlflow ui`: the run's artifact `artifact_path` shown in the artifact viewer (an
        .html file renders there), in the Model-training view."""
        from urllib.parse import quote

        return (f"#/experiments/{self.experiment_id}/runs/{run_id}/artifacts/{quote(artifact_path, safe='/')}"
                f"?{MODEL_TRAINING_VIEW}")

    def browse_line(self, fragment: str) -> str | None:
        """`browse: <link>` for a `run_url` / `artifact_url` fragment: the server's own URL (password masked)
        for an http(s) store; for a database store, the `mlflow ui` command to start and the local URL to
        open; None where there is no UI to point at (databricks)."""
        if self.uri.startswith(("http://", "https://")):
            return f"browse: {mask_url(self.uri).rstrip('/')}/{fragment}"
        scheme = self.uri.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
            # Two spaces before "then": the command ends there, so a double click selects just the URI.
            return (f"browse: mlflow ui --backend-store-uri {mask_url(self.uri)}  then open "
                    f"http://127.0.0.1:5000/{fragment}")
        return None

    # -- logging --------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._call(self.client.log_batch, run_id, params=items[i:i + _PARAMS_PER_BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """One epoch's metrics in one request; retried as a whole (the store drops exact duplicates)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._call(self.client.log_batch, run_id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)

    def log_metric_points(self, run_id: str, points: Iterable[tuple[str, float, int, int]]) -> None:
        """(key, value, step, timestamp ms) points of many keys and steps in one request (1000 per request).
        A caller that passes the same timestamp for the same data makes a repeat a no-op: the store drops
        exact duplicates (key, value, step, timestamp)."""
        from mlflow.entities import Metric

        items = [Metric(key, float(value), int(timestamp), int(step)) for key, value, step, timestamp in points]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._call(self.client.log_batch, run_id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, mask_url(v)) for k, v in tags.items()]
        if items:
            self._call(self.client.log_batch, run_id, tags=items, synchronous=True)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, run_id, mask_url(text), artifact_file)

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.log_text(run_id, json.dumps(mask_secrets(obj), indent=2, default=str), artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            figure.savefig(path, dpi=110, bbox_inches="tight")
            parent = str(Path(artifact_file).parent)
            self.log_artifact(run_id, path, None if parent == "." else parent)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self._call(self.client.get_metric_history, run_id, key)]


# A store file that cannot be written or read is no server that might come back.
_PERMANENT_SQLITE_ERRORS = ("readonly database", "file is not a database", "disk image is malformed")


def is_transient_mlflow_error(error: BaseException) -> bool:
    """Connection refused / reset / timed out, a server answering 429 / 502 / 503 / 504, a locked sqlite store."""
    import requests
    from mlflow.exceptions import MlflowException

    for cause in error_chain(error):
        if isinstance(cause, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
            return True
        if isinstance(cause, requests.HTTPError) and cause.response is not None:
            return cause.response.status_code in _RETRY_STATUSES
        message = str(cause)
        if any(text in message for text in _PERMANENT_SQLITE_ERRORS):
            return False   # MLflow calls every sqlite OperationalError "temporarily unavailable" (503)
        if "database is locked" in message:
            return True
        if isinstance(cause, MlflowException):
            if message.startswith("API request to") and ("failed with exception" in message
                                                         or "timeout" in message):
                return True
            return cause.get_http_status_code() in _RETRY_STATUSES
    return False


def _param_value(value: Any) -> str:
    value = mask_secrets(value)
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= _PARAM_VALUE_MAX else text[:_PARAM_VALUE_MAX - 3] + "..."
