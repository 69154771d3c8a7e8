"""Bounded retries (pitsearch.retry), which errors count as a lost server, and credentials never shown; no server
needed (unreachable ones are ports nobody listens on)."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import pytest

from pitsearch.errors import ConfigError
from pitsearch.masking import mask_secrets, mask_url
from pitsearch.retry import ServiceUnavailable, retry_call
from servers import free_port


def _flaky(failures: int, error: Exception):
    calls = []

    def fn(x):
        calls.append(x)
        if len(calls) <= failures:
            raise error
        return x * 2

    return fn, calls


def test_retry_call_waits_out_transient_errors():
    fn, calls = _flaky(2, ConnectionError("refused"))
    assert retry_call(fn, 21, service="S", target="t", is_transient=lambda e: isinstance(e, ConnectionError),
                      timeout_s=10, first_delay_s=0.01) == 42
    assert len(calls) == 3


def test_retry_call_gives_up_after_the_timeout_with_one_masked_line():
    fn, calls = _flaky(10**6, ConnectionError("connection to postgresql://u:hunter2@db/x refused"))
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as raised:
        retry_call(fn, 1, service="Optuna storage", target="postgresql://u:hunter2@db/x",
                   is_transient=lambda e: True, timeout_s=0.5, first_delay_s=0.05)
    assert 0.5 <= time.monotonic() - started < 2 and len(calls) >= 3
    message = str(raised.value)
    assert "\n" not in message and "hunter2" not in message
    assert message.startswith("Optuna storage postgresql://u:***@db/x unreachable for ")
    assert "s (sweep.retry_timeout_s); last error: " in message
    assert "ConnectionError: connection to postgresql://u:***@db/x refused" in message


def test_retry_call_raises_other_errors_at_once():
    fn, calls = _flaky(1, ValueError("bad value"))
    with pytest.raises(ValueError):
        retry_call(fn, 1, service="S", target="t", is_transient=lambda e: isinstance(e, ConnectionError))
    assert len(calls) == 1


def _ctrl_c_inside(times: int = 1, then: Exception | None = None):
    """A call that receives `times` Ctrl-Cs midway, then finishes (or raises `then`); `done` says it finished."""
    done = []

    def fn():
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the signal handler here at the latest
        if then is not None:
            raise then
        done.append(True)
        return "stored"

    return fn, done


def test_ctrl_c_inside_a_call_is_raised_when_the_call_has_finished():
    fn, done = _ctrl_c_inside()
    with pytest.raises(KeyboardInterrupt):
        retry_call(fn, service="S", target="t", is_transient=lambda e: False)
    assert done == [True]   # not cut in half
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_inside_a_call_is_raised_at_once():
    fn, done = _ctrl_c_inside(times=2)
    with pytest.raises(KeyboardInterrupt):
        retry_call(fn, service="S", target="t", is_transient=lambda e: False)
    assert done == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_held_during_a_failing_call_is_not_lost():
    fn, _ = _ctrl_c_inside(then=ValueError("bad request"))
    with pytest.raises(KeyboardInterrupt):
        retry_call(fn, service="S", target="t", is_transient=lambda e: False)


def test_calls_from_other_threads_leave_signal_handling_alone():
    results = []
    thread = threading.Thread(target=lambda: results.append(
        retry_call(lambda: "ok", service="S", target="t", is_transient=lambda e: False)))
    thread.start()
    thread.join()
    assert results == ["ok"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_an_mlflow_write_leaves_the_sqlite_store_complete_and_unlocked(tmp_path, monkeypatch):
    from pitsearch.tracking import Tracker

    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", "interrupts")
    run_id = tracker.start_run(run_name="r")
    real_log_batch = tracker.client.log_batch

    def log_batch_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", log_batch_hit_by_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tracker.log_metrics(run_id, {"val/acc": 0.5}, step=0)
    monkeypatch.undo()
    assert tracker.metric_history(run_id, "val/acc") == [(0, 0.5)]
    other = sqlite3.connect(db, timeout=0.5)   # another writer gets the file at once
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()
    tracker.end_run(run_id, status="KILLED")
    assert tracker.run_status(run_id) == "KILLED"


def test_database_errors_lost_connection_is_transient_bad_password_is_not():
    import optuna
    import sqlalchemy.exc as sa_exc

    from pitsearch.search.storage import is_transient_db_error

    def wrapped(text):
        try:
            try:
                raise sa_exc.OperationalError("SELECT 1", {}, Exception(text))
            except sa_exc.OperationalError as inner:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from inner
        except optuna.exceptions.StorageInternalError as outer:
            return outer

    assert is_transient_db_error(wrapped("server closed the connection unexpectedly"))
    assert is_transient_db_error(wrapped("connection refused"))
    assert not is_transient_db_error(wrapped('password authentication failed for user "x"'))
    assert not is_transient_db_error(wrapped('database "nope" does not exist'))
    assert not is_transient_db_error(ValueError("nope"))


def test_mlflow_errors_lost_server_is_transient_bad_request_is_not():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from pitsearch.tracking import is_transient_mlflow_error

    assert is_transient_mlflow_error(MlflowException("API request to http://h/api/2.0/mlflow/runs/log-batch failed "
                                                     "with exception HTTPConnectionPool(...): Max retries exceeded"))
    assert is_transient_mlflow_error(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient_mlflow_error(MlflowException("Changing param values is not allowed",
                                                         error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient_mlflow_error(KeyError("x"))


def test_unreachable_postgres_is_a_one_line_config_error_after_the_retry_window():
    pytest.importorskip("psycopg")
    from pitsearch.search.storage import make_storage

    url = f"postgresql://alice:hunter2@127.0.0.1:{free_port()}/optuna"
    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        make_storage(url, None, retry_timeout_s=1)
    assert 1 <= time.monotonic() - started < 15
    message = str(raised.value)
    assert message.startswith("sweep.storage: Optuna storage postgresql://alice:***@127.0.0.1:")
    assert "unreachable for" in message and "hunter2" not in message


def test_unreachable_tracking_server_gives_up_then_fails_fast(monkeypatch):
    from pitsearch.tracking import Tracker

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    uri = f"http://bob:hunter2@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as raised:
        Tracker(uri, "x", retry_timeout_s=1)
    assert time.monotonic() - started < 15  # MLflow's own retries (minutes) are off: pitsearch bounds the wait
    assert "MLflow tracking server http://bob:***@127.0.0.1" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_tracker_breaker_and_run_dedup_on_a_local_store(tmp_path, monkeypatch):
    from pitsearch.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "e", retry_timeout_s=0.3)
    # A create whose reply is lost: the retry finds the run it made instead of making a second one.
    real_create = tracker.client.create_run
    lost_replies = []

    def create_then_drop_the_reply(*args, **kwargs):
        run = real_create(*args, **kwargs)
        if not lost_replies:
            lost_replies.append(run.info.run_id)
            raise ConnectionError("reset by peer")
        return run

    monkeypatch.setattr(tracker.client, "create_run", create_then_drop_the_reply)
    run_id = tracker.start_run("r", tags={"storage": "postgresql://u:hunter2@h/db"})
    assert run_id == lost_replies[0]
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 1
    tracker.log_params(run_id, {"tracking.uri": "http://u:hunter2@h:5000", "nested": {"a": "mysql://x:y@z/w"}})
    tracker.log_text(run_id, "storage: postgresql://u:hunter2@h/db\n", "config.yaml")
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"tracking.uri": "http://u:***@h:5000", "nested": '{"a": "mysql://x:***@z/w"}'}
    assert run.data.tags["storage"] == "postgresql://u:***@h/db"
    assert "hunter2" not in tracker.client.download_artifacts(run_id, "config.yaml", str(tmp_path)) and \
        "hunter2" not in (tmp_path / "config.yaml").read_text()

    # Down for longer than the window: the first call waits and gives up, the next ones fail at once.
    calls = []

    def down(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("refused")

    monkeypatch.setattr(tracker.client, "log_batch", down)
    with pytest.raises(ServiceUnavailable):
        tracker.log_metrics(run_id, {"a": 1.0})
    waiting_calls = len(calls)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        tracker.set_tags(run_id, {"state": "FAILED"})
    assert time.monotonic() - started < 0.2 and len(calls) == waiting_calls + 1 and tracker._down is not None
    monkeypatch.undo()
    tracker.log_metrics(run_id, {"a": 1.0})   # back: the breaker closes again
    assert tracker._down is None


def test_mask_url_and_secrets():
    assert mask_url("see postgresql://a:b@h/x and http://c:d@e:1/") == "see postgresql://a:***@h/x and http://c:***@e:1/"
    assert mask_url("http://h:5000 and u@example.org") == "http://h:5000 and u@example.org"
    assert mask_secrets({"a": ["redis://:pw@h:6379"], "b": 3}) == {"a": ["redis://:***@h:6379"], "b": 3}


@pytest.mark.parametrize("key, value", [("retry_timeout_s", -1), ("retry_timeout_s", "soon"),
                                        ("heartbeat_interval_s", 0), ("heartbeat_interval_s", 1.5)])
def test_retry_and_heartbeat_keys_are_validated(key, value):
    from pitsearch.search.spec import parse_sweep

    node = {"study_name": "s", "objectives": [{"metric": "val/acc", "direction": "maximize"}],
            "sampler": {"name": "grid"}, "space": {"train.lr": {"choices": [0.1, 0.2]}}, key: value}
    with pytest.raises(ConfigError, match=f"sweep.{key}"):
        parse_sweep(node)
