"""A sweep on a "cluster": several `python -m pitsearch +sweep=NAME` processes (one per machine, each in its own
working directory) against one real PostgreSQL storage and one real `mlflow server`, both on 127.0.0.1.

The servers come from tests/servers.py (session fixtures; skipped without PostgreSQL, failed under CI=true).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections import Counter
from pathlib import Path

import optuna
import pytest

from helpers import TINY_SWEEP, completed_cells, states, write_sweep
from servers import TcpProxy, free_port, mlflow_server, postgres, start_process, stop_process  # noqa: F401

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CELLS = 12
MLFLOW_SECRET = "mlflow-s3cret"   # userinfo in the tracking URI: the server ignores it, pitsearch must mask it


@pytest.fixture
def cluster(tmp_path, postgres, mlflow_server):
    """Launches machines (processes) on one sweep; kills whatever is left at the end."""
    return Cluster(tmp_path, postgres, mlflow_server)


class Cluster:
    def __init__(self, tmp_path: Path, postgres, mlflow_server):
        self.tmp_path, self.postgres, self.mlflow = tmp_path, postgres, mlflow_server
        self.name = "c_" + tmp_path.name.replace("-", "_")[-40:].lower()
        self.storage = postgres.create_database(self.name)
        self.tracking_uri = mlflow_server.uri.replace("://", f"://pitsearch:{MLFLOW_SECRET}@")
        self.config_dir = tmp_path / "cfg"
        self.processes: list = []
        self.logs: list[Path] = []
        self._study: optuna.Study | None = None

    def write_sweep(self, epochs: int = 1) -> None:
        write_sweep(self.config_dir, self.name, TINY_SWEEP.format(
            name=self.name, epochs=epochs, workers=1, seeds="[0, 1, 2]", pruner="{name: none}",
            space="    model.pool: {choices: [conv, max, avg, none]}",
            extra="  heartbeat_interval_s: 5\n  report: false\n"))

    def launch(self, *overrides: str, tracking_uri: str | None = None, password_from_env: bool = False):
        index = len(self.processes)
        machine = self.tmp_path / f"machine{index}"
        machine.mkdir()
        log = machine / "output.log"
        storage, env = self.storage, None
        if password_from_env:  # libpq reads PGPASSWORD when the URL has none
            storage = self.postgres.url(self.name, password=False)
            env = {"PGPASSWORD": self.postgres.password}
        process = start_process([sys.executable, "-m", "pitsearch", "--config-dir", str(self.config_dir),
                                 f"+sweep={self.name}", f"sweep.storage={storage}",
                                 f"tracking.uri={tracking_uri or self.tracking_uri}", *overrides], machine, log, env)
        self.processes.append(process)
        self.logs.append(log)
        return process

    def output(self, index: int | None = None) -> str:
        logs = self.logs if index is None else [self.logs[index]]
        return "\n".join(f"--- {log.parent.name}\n{log.read_text(errors='replace')}" for log in logs)

    def report(self) -> str:
        """Each machine's exit status and the end of its output, for assertion messages."""
        return "\n".join(f"--- {log.parent.name} (exit {p.returncode})\n{log.read_text(errors='replace')[-2500:]}"
                         for p, log in zip(self.processes, self.logs))

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for process in self.processes:
                process.wait(timeout=max(1, deadline - time.monotonic()))
        except Exception:
            raise AssertionError(f"machines still running after {timeout:.0f}s\n{self.report()}")
        finally:
            self.stop()
        return [p.returncode for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, timeout=10)

    def study(self) -> optuna.Study:
        from pitsearch.search.storage import make_storage

        if self._study is None:
            self._study = optuna.load_study(study_name=self.name, storage=make_storage(self.storage, self.tmp_path))
        return self._study

    def wait_for_trial(self, predicate, timeout: float = 120, what: str = "trial"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise AssertionError(f"a machine exited early\n{self.report()}")
            try:
                trials = self.study().get_trials(deepcopy=False)
            except KeyError:  # the study is not created yet
                trials = []
            found = [t for t in trials if predicate(t)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout:.0f}s\n{self.report()}")

    def runs(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow.uri)
        experiment = client.get_experiment_by_name(self.name)
        runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        return client, parents, children


def assert_every_cell_completed_once(study) -> None:
    cells = completed_cells(study)
    assert len(cells) == CELLS and set(cells.values()) == {1}, cells
    counts = states(study)
    assert counts["COMPLETE"] == CELLS and counts["RUNNING"] == 0 and counts["WAITING"] == 0, counts


def assert_no_secret(cluster: Cluster, text: str, where: str) -> None:
    for secret in (cluster.postgres.password, MLFLOW_SECRET):
        assert secret not in text, f"a password appears in {where}"


def test_three_machines_share_one_postgres_study_and_one_parent_run(cluster):
    cluster.write_sweep()
    cluster.launch()
    cluster.launch()
    cluster.launch(password_from_env=True)
    assert cluster.wait() == [0, 0, 0], cluster.report()

    study = cluster.study()
    assert_every_cell_completed_once(study)
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2  # the machines really shared the grid
    hydra_files = [p for p in cluster.tmp_path.rglob(".hydra/*.yaml")]
    for path in hydra_files:  # Hydra's own record of the command line
        assert_no_secret(cluster, path.read_text(), str(path))

    client, parents, children = cluster.runs()
    assert len(parents) == 1 and len(children) == CELLS
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")] == [0]

    # Credentials: masked in what was printed, in params / tags / artifacts, and in the trials' stored configs.
    assert_no_secret(cluster, cluster.output(), "the machines' output")
    assert parent.data.params["sweep.storage"] in (cluster.postgres.url(cluster.name).replace(
        cluster.postgres.password, "***"), cluster.postgres.url(cluster.name, password=False))
    assert parent.data.tags["storage"] == parent.data.params["sweep.storage"]
    assert children[0].data.params["tracking.uri"].startswith("http://pitsearch:***@127.0.0.1:")
    for run in (parent, children[0]):
        assert_no_secret(cluster, json.dumps([run.data.params, run.data.tags]), f"run {run.info.run_name}")
    for run_id, artifact in ((parent.info.run_id, "sweep.yaml"), (parent.info.run_id, "base_config.yaml"),
                             (children[0].info.run_id, "config.yaml")):
        path = client.download_artifacts(run_id, artifact, str(cluster.tmp_path))
        assert_no_secret(cluster, Path(path).read_text(), artifact)
    assert_no_secret(cluster, json.dumps([t.user_attrs for t in study.trials], default=str), "trial user attrs")
    assert_no_secret(cluster, json.dumps(study.user_attrs, default=str), "study user attrs")


def test_a_machine_killed_mid_trial_leaves_its_cell_to_the_others(cluster):
    cluster.write_sweep(epochs=2)
    victim = cluster.launch()
    survivor = cluster.launch()
    worker = f"{socket.gethostname()}:{victim.pid}"
    cluster.wait_for_trial(lambda t: t.state.name == "RUNNING" and t.user_attrs.get("worker") == worker
                           and "mlflow_run_id" in t.user_attrs, what="running trial on the victim")
    os.killpg(victim.pid, signal.SIGKILL)   # no chance to clean up
    assert survivor.poll() is None, "the survivor finished before the victim was killed"
    assert cluster.wait()[1] == 0, cluster.report()

    study = cluster.study()
    assert_every_cell_completed_once(study)
    dead = [t for t in study.trials if t.state.name == "FAIL"]
    assert dead and all(t.user_attrs["worker"] == worker for t in dead)
    assert all("died" in t.user_attrs["fail_reason"] for t in dead)
    assert "left RUNNING by a dead worker" in cluster.output(1)
    _, _, children = cluster.runs()
    assert Counter(r.info.status for r in children) == {"FINISHED": CELLS, "FAILED": len(dead)}


def test_mlflow_server_restarted_mid_sweep_loses_no_metrics(cluster):
    cluster.write_sweep(epochs=2)
    for _ in range(2):
        cluster.launch("sweep.retry_timeout_s=120")
    cluster.wait_for_trial(lambda t: t.state.name == "COMPLETE", what="completed trial")
    cluster.mlflow.stop()
    outage_started = time.monotonic()
    time.sleep(3)
    try:
        assert all(p.poll() is None for p in cluster.processes)
    finally:
        cluster.mlflow.start()   # same port, same store; takes several seconds to answer /health
    outage = time.monotonic() - outage_started
    assert cluster.wait() == [0, 0], cluster.report()

    study = cluster.study()
    assert_every_cell_completed_once(study)
    client, parents, children = cluster.runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == CELLS and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        for key in ("train/loss", "val/acc", "val/acc_best"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [0, 1], (key, child.info)
    assert "unreachable" in cluster.output(), f"no worker noticed a {outage:.0f}s outage"


def test_a_worker_that_loses_mlflow_for_good_fails_its_trial_and_exits_with_one_line(cluster):
    cluster.write_sweep(epochs=2)
    proxy = TcpProxy(cluster.mlflow.port)
    try:
        cluster.launch("sweep.retry_timeout_s=3",
                       tracking_uri=f"http://pitsearch:{MLFLOW_SECRET}@127.0.0.1:{proxy.port}")
        cluster.wait_for_trial(lambda t: t.state.name == "COMPLETE", what="completed trial")
        cluster.wait_for_trial(lambda t: t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs,
                               what="second trial")
    finally:
        proxy.close()
    started = time.monotonic()
    assert cluster.wait(timeout=60) == [3], cluster.output()
    assert time.monotonic() - started < 45

    lines = [line for line in cluster.output(0).splitlines() if line.strip()]
    assert lines[-1].startswith("error: worker 0: trial ") and "unreachable for" in lines[-1], lines[-5:]
    assert "marked FAIL and queued again" in lines[-1]
    assert_no_secret(cluster, cluster.output(), "the output")
    study = cluster.study()
    counts = states(study)
    assert counts["COMPLETE"] >= 1 and counts["FAIL"] == 1 and counts["WAITING"] == 1, counts
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "MLflow tracking server" in failed.user_attrs["fail_reason"]
    client, _, children = cluster.runs()   # what was stored before the loss is still there
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for trial in done:
        assert len(client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val/acc")) == 2


def test_machines_opening_an_empty_database_together_all_get_the_storage(postgres, tmp_path):
    # Optuna creates its tables on first use; four at once used to fail all but one ("duplicate key value").
    url = postgres.create_database("empty")
    code = f"from pitsearch.search.storage import make_storage; make_storage({url!r}, None).get_all_studies()"
    processes = [start_process([sys.executable, "-c", code], tmp_path, tmp_path / f"open{i}.log") for i in range(4)]
    for process in processes:
        process.wait(timeout=120)
    assert [p.returncode for p in processes] == [0] * 4, [(tmp_path / f"open{i}.log").read_text()[-800:]
                                                          for i in range(4)]


def test_a_silent_heartbeat_on_another_machine_requeues_the_trial(postgres, tmp_path):
    from pitsearch.search.storage import TrialHeartbeat, make_storage
    from pitsearch.search.worker import _ask, reap_dead_workers

    storage = make_storage(postgres.create_database("heartbeat"), tmp_path, heartbeat_interval=1)
    study = optuna.create_study(study_name="hb", storage=storage)
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    with pytest.warns(UserWarning, match="Heartbeat of storage"):   # why the worker's _ask silences it
        dead = study.ask(space)
    dead.set_user_attr("worker", "another-machine:4242")   # its pid cannot be checked from here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alive = _ask(study, space)
    alive.set_user_attr("worker", "a-third-machine:7")
    lines = []
    with TrialHeartbeat(study, alive._trial_id):
        storage.record_heartbeat(dead._trial_id)   # it beat once, then its machine went away
        time.sleep(3.5)                            # > grace period (2 x 1 s)
        failed = reap_dead_workers(study, None, lines.append)
    assert [t.number for t in failed] == [dead.number]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[dead.number].state.name == "FAIL"
    assert "stopped its heartbeat" in trials[dead.number].user_attrs["fail_reason"]
    assert trials[alive.number].state.name == "RUNNING"
    retry = [t for t in trials.values() if t.state.name == "WAITING"]
    assert len(retry) == 1 and retry[0].params == trials[dead.number].params
    assert retry[0].user_attrs["retry_of"] == dead.number and lines


def test_the_storage_waits_out_a_database_restart_and_gives_up_with_a_masked_error(postgres, tmp_path):
    from pitsearch.retry import ServiceUnavailable
    from pitsearch.search.storage import make_storage

    url = postgres.create_database("restart")
    storage = make_storage(url, tmp_path, retry_timeout_s=60)
    study = optuna.create_study(study_name="r", storage=storage)
    study.set_user_attr("before", 1)
    postgres.stop()
    restarter = threading.Timer(2.0, postgres.start)
    restarter.start()
    try:
        started = time.monotonic()
        study.set_user_attr("after", 2)   # waits for the server to come back
        assert time.monotonic() - started >= 1.5
    finally:
        restarter.join()
    assert optuna.load_study(study_name="r", storage=url).user_attrs == {"before": 1, "after": 2}

    storage.retry_timeout_s = 2
    postgres.stop()
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as raised:
            study.set_user_attr("never", 3)
        assert 2 <= time.monotonic() - started < 20
    finally:
        postgres.start()
    assert postgres.password not in str(raised.value)
    assert "Optuna storage postgresql://pitsearch:***@127.0.0.1" in str(raised.value)


def test_optuna_dashboard_opens_the_postgres_storage(postgres, tmp_path):
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        from servers import _missing

        _missing("optuna-dashboard is not installed (pip install -e '.[dev]')")
    url = postgres.create_database("dashboard")
    study = optuna.create_study(study_name="shown", storage=url)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    port = free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    process = start_process([str(dashboard), url, "--host", "127.0.0.1", "--port", str(port)], tmp_path,
                            tmp_path / "dashboard.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["shown"]
        study_id = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=5) as response:
            assert len(json.loads(response.read())["trials"]) == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as response:
            assert response.status == 200
    finally:
        stop_process(process)
