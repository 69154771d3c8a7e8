"""Real servers for the cluster tests (and bench/scaling.py): PostgreSQL and an MLflow tracking server, each on
127.0.0.1 at a port chosen at runtime, started in its own process group and always stopped.

PostgreSQL comes from the system (`pg_ctl` / `initdb` on PATH or under /usr/lib/postgresql/*/bin, or
$PITSEARCH_PG_BIN). It refuses to run as root, so under root the cluster is initialised and run as the
`postgres` user (or `nobody`) via `runuser`, in a fresh /tmp folder owned by that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_USER = "pitsearch"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    configured = os.environ.get("PITSEARCH_PG_BIN")
    candidates = [Path(configured)] if configured else []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                                           reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group (the server and everything it forked), then SIGKILL what is left."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class PostgresServer:
    """A throwaway PostgreSQL cluster: `start()`, `url(db)`, `create_database(name)`, `stop()`, `cleanup()`.

    The role `pitsearch` has a random password, so URLs carry a secret that must never show up in logs.
    """

    def __init__(self, bin_dir: Path, durable: bool = False):
        self.bin_dir = Path(bin_dir)
        self.durable = durable      # False: fsync off (tests); True: PostgreSQL's defaults (benchmarks)
        self.password = secrets.token_hex(8)
        self.port: int | None = None
        self.root = Path(tempfile.mkdtemp(prefix="pitsearch-pg-"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self._run_as = None
        if os.geteuid() == 0:  # initdb refuses root
            self._run_as = "postgres" if _user_exists("postgres") else "nobody"
            os.chmod(self.root, 0o755)
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self._run_as, "--", *argv] if self._run_as else argv

    def _initdb(self) -> None:
        self.sockets.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(self._as_user([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", PG_USER,
                                      f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                                      "-E", "UTF8", "--no-instructions"]),
                       check=True, capture_output=True, text=True, timeout=120)
        pwfile.unlink()

    def start(self, port: int | None = None) -> "PostgresServer":
        settings = [f"-k {self.sockets}", "-c listen_addresses=127.0.0.1", "-c max_connections=200"]
        if not self.durable:
            settings += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        last = None
        for _ in range(3):  # a port picked at runtime may be taken by the time the server binds it
            self.port = port or self.port or free_port()
            options = " ".join([f"-p {self.port}", *settings])
            result = subprocess.run(self._as_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                                   "-w", "-t", "60", "-o", options, "start"]),
                                    capture_output=True, text=True, timeout=90)
            if result.returncode == 0:
                return self
            last = result.stderr + result.stdout + self._log_tail()
            if port is not None:
                break
            self.port = None
        raise RuntimeError(f"PostgreSQL did not start:\n{last}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                                          "-t", "60", "stop"]), capture_output=True, text=True, timeout=90)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{PG_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and served artifacts, one uvicorn worker."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "MlflowServer":
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
        command += ["server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: fewer processes
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.pid_file.write_text(str(self.process.pid))   # .ci/run stops it if a test run is killed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self._log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout:.0f}s:\n{self._log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def pid_file(self) -> Path:
        return self.root / "mlflow-server.pid"

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)
            self.process = None
            self.pid_file.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def start_process(argv: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A child in its own session (so a test can kill its whole group), output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})})


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    _stop_group(process, timeout)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:target_port, in threads. `close()` refuses new connections and cuts the open
    ones: from a client's side, the server is gone."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept(); close() alone would not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self._sockets.clear()


# ---------------------------------------------------------------------------------------------- pytest fixtures
# (test modules import them: `from servers import mlflow_server, postgres`)

try:
    import pytest
except ImportError:  # bench/scaling.py uses the server classes without pytest
    pytest = None


def _missing(what: str) -> None:
    """Skip locally; fail in CI (CI=true), where the cluster tests must prove themselves."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} (CI=true: the cluster tests must run here; see .ci/run)", pytrace=False)
    pytest.skip(what)


if pytest is not None:
    @pytest.fixture(scope="session")
    def postgres():
        """A PostgreSQL server on 127.0.0.1 for the whole test session (stopped and deleted at its end)."""
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            _missing("PostgreSQL is not installed (no initdb / pg_ctl on PATH or under /usr/lib/postgresql/*/bin; "
                     "apt-get install postgresql)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _missing("psycopg is not installed (pip install -e '.[dev]')")
        server = PostgresServer(bin_dir)
        try:
            server.start()
            yield server
        finally:
            server.cleanup()

    @pytest.fixture(scope="session")
    def mlflow_server(tmp_path_factory):
        """`mlflow server` on 127.0.0.1 (sqlite backend, served artifacts) for the whole test session."""
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
        try:
            server.start()
            yield server
        finally:
            server.stop()
