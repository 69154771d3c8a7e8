"""How a sweep scales with workers, on the journal file storage and on PostgreSQL.

1. Real trials: `python -m pitsearch +sweep=...` (tiny PiT on digits, 1 epoch, 8-cell grid) with 1 and 2 worker
   processes, MLflow on a local `mlflow server`; trials/hour from the study's own timestamps (first trial start to
   last trial end, so start-up is excluded) and the command's wall time.
2. Simulated trials (a trivial objective, but pitsearch's per-trial storage traffic: dead-worker check, budget
   check, ask, ~12 user attributes, heartbeat, tell) with 1, 2, 8 and 32 worker processes for a fixed time:
   the orchestration ceiling in trials/hour, and the per-trial storage latency.
3. Ask / tell latency as one study grows to 1,200 trials (one process, same simulated trial), per 200 trials.

PostgreSQL runs with its default durability (fsync on) from a throwaway cluster on 127.0.0.1 (tests/servers.py);
pass --postgres URL to use your own server instead.

    python bench/scaling.py [--quick] [--postgres URL] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # tests/servers.py: PostgreSQL and MLflow servers on 127.0.0.1

TINY_SWEEP = """# @package _global_
defaults:
  - /sweep_base@sweep: default
  - override /data: digits
model: {{patch_size: 2, stride: 1, depths: [1, 1, 1], heads: [1, 2, 4], head_dims: [8, 8, 8]}}
train: {{epochs: 1, progress: false}}
tracking: {{experiment: {name}}}
sweep:
  study_name: {name}
  objectives: [{{metric: val/acc_best, direction: maximize}}]
  sampler: {{name: grid}}
  seeds: [0, 1]
  report: false
  space:
    model.pool: {{choices: [conv, max, avg, none]}}
"""

# What a pitsearch worker stores per trial (sizes as in a real trial: the resolved config, a 1-epoch history).
TRIAL_ATTRS = {
    "variant": "model.pool=conv", "seed": 0, "macs": 208896, "params": 18858,
    "config": {"model": {f"key{i}": [i, i + 1, i + 2] for i in range(40)},
               "train": {f"key{i}": 0.001 * i for i in range(30)}, "data": {"name": "digits", "val_fraction": 0.2}},
    "mlflow_run_id": "0" * 32,
    "history": {f"metric{i}": [0.5] for i in range(10)}, "final": {f"metric{i}": 0.5 for i in range(10)},
    "train_seconds": 1.0, "eval_seconds": 0.1, "wall_seconds": 1.5,
}


# ---------------------------------------------------------------------------------------------- simulated trials


def _open(storage_value: str, folder: str):
    import optuna

    from pitsearch.search.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return make_storage(storage_value, Path(folder))


def simulated_trial(study) -> tuple[float, float]:
    """One trial's storage traffic as pitsearch's worker makes it; returns (before-tell s, tell s)."""
    from pitsearch.search.storage import TrialHeartbeat
    from pitsearch.search.trials import count_finished, mark_worker, tell
    from pitsearch.search.worker import _ask, reap_dead_workers

    started = time.perf_counter()
    reap_dead_workers(study, None, lambda line: None)
    count_finished(study)                      # the budget check
    trial = _ask(study)
    mark_worker(trial)
    x = trial.suggest_float("x", -10, 10)
    trial.suggest_categorical("pool", ["conv", "max", "avg", "none"])
    with TrialHeartbeat(study, trial._trial_id):
        for key, value in TRIAL_ATTRS.items():
            trial.set_user_attr(key, value)
    told = time.perf_counter()
    tell(study, trial, x * x)
    return told - started, time.perf_counter() - told


def _sim_worker(storage_value, folder, study_name, ready, go, stop_at, results):
    import optuna

    storage = _open(storage_value, folder)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    simulated_trial(study)   # warm-up (lazy imports, connection pool), not measured
    ready.release()
    go.wait()
    latencies = []
    while time.time() < stop_at.value:
        latencies.append(simulated_trial(study))
    results.put(latencies)


def simulated_throughput(storage_value: str, folder: str, workers: int, seconds: float) -> dict:
    import optuna

    name = f"sim_{workers}_{int(time.time() * 1000)}"
    optuna.create_study(study_name=name, storage=_open(storage_value, folder))
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    stop_at = ctx.Value("d", 0.0)
    processes = [ctx.Process(target=_sim_worker, args=(storage_value, folder, name, ready, go, stop_at, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    for _ in processes:
        if not ready.acquire(timeout=300):
            raise RuntimeError("a simulated worker did not start")
    stop_at.value = time.time() + seconds
    go.set()
    latencies = [item for _ in processes for item in results.get(timeout=seconds + 300)]
    for process in processes:
        process.join(timeout=60)
    before, tell = zip(*latencies) if latencies else ((), ())
    return {"workers": workers, "trials": len(latencies), "trials_per_hour": len(latencies) * 3600 / seconds,
            "ms_before_tell_p50": 1000 * statistics.median(before), "ms_tell_p50": 1000 * statistics.median(tell),
            "ms_trial_p95": 1000 * _percentile([a + b for a, b in latencies], 95)}


def growth(storage_value: str, folder: str, n_trials: int, bucket: int) -> list[dict]:
    import optuna

    study = optuna.create_study(study_name=f"growth_{int(time.time() * 1000)}", storage=_open(storage_value, folder),
                                sampler=optuna.samplers.RandomSampler())
    rows = []
    for start in range(0, n_trials, bucket):
        latencies = [simulated_trial(study) for _ in range(bucket)]
        before, tell = zip(*latencies)
        rows.append({"trials": f"{start}-{start + bucket}", "ms_before_tell_p50": 1000 * statistics.median(before),
                     "ms_tell_p50": 1000 * statistics.median(tell)})
    return rows


# ---------------------------------------------------------------------------------------------- real trials


def real_sweep(storage_value: str | None, tracking_uri: str | None, workers: int, folder: Path, tag: str) -> dict:
    import optuna

    from pitsearch.search.storage import make_storage

    name = f"real_{tag}"
    config_dir = folder / f"cfg_{tag}"
    (config_dir / "sweep").mkdir(parents=True)
    (config_dir / "sweep" / f"{name}.yaml").write_text(TINY_SWEEP.format(name=name))
    work = folder / f"run_{tag}"
    work.mkdir()
    args = [sys.executable, "-m", "pitsearch", "--config-dir", str(config_dir), f"+sweep={name}",
            f"sweep.n_workers={workers}"]
    args += [f"sweep.storage={storage_value}"] if storage_value else []
    args += [f"tracking.uri={tracking_uri}"] if tracking_uri else ["tracking.enabled=false"]
    started = time.perf_counter()
    result = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    storage = make_storage(storage_value, work / "pitsearch-sweeps" / name)
    trials = [t for t in optuna.load_study(study_name=name, storage=storage).trials if t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return {"workers": workers, "trials": len(trials), "trials_per_hour": len(trials) * 3600 / span,
            "mean_trial_s": statistics.mean((t.datetime_complete - t.datetime_start).total_seconds() for t in trials),
            "wall_s": wall}


# ---------------------------------------------------------------------------------------------- main


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:,.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test of the benchmark)")
    parser.add_argument("--postgres", help="a PostgreSQL URL to use instead of a throwaway local cluster")
    parser.add_argument("--workers", default="1,2,8,32", help="simulated worker counts")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each simulated run")
    parser.add_argument("--skip-real", action="store_true", help="skip the real-trial sweeps")
    parser.add_argument("--storages", default="journal,postgresql", help="which storages to measure")
    parser.add_argument("--growth-trials", type=int, default=None, help="study size for the latency growth")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 30.0)
    growth_trials = args.growth_trials if args.growth_trials is not None else (200 if args.quick else 1200)

    import servers

    folder = Path(tempfile.mkdtemp(prefix="pitsearch-bench-"))
    postgres = mlflow = None
    results: dict = {"cpus": os.cpu_count(), "simulated_seconds": seconds}
    try:
        if args.postgres:
            pg_url = args.postgres
        else:
            bin_dir = servers.postgres_bin_dir()
            if bin_dir is None:
                sys.exit("PostgreSQL is not installed (apt-get install postgresql), or pass --postgres URL")
            postgres = servers.PostgresServer(bin_dir, durable=True).start()
            pg_url = postgres.create_database("bench")
        storages = {"journal": str(folder / "journal" / "optuna.log"), "postgresql": pg_url}
        storages = {k: v for k, v in storages.items() if k in args.storages.split(",")}
        (folder / "journal").mkdir()

        if not args.skip_real:
            mlflow = servers.MlflowServer(folder / "mlflow").start()
            real = []
            for label, value in storages.items():
                for workers in (1, 2):
                    row = real_sweep(value if label == "postgresql" else None, mlflow.uri, workers, folder,
                                     f"{label}_{workers}")
                    real.append({"storage": label, **row})
                    print(f"real  {label:10s} workers={workers}: {row['trials_per_hour']:,.0f} trials/h", flush=True)
            row = real_sweep(None, None, 1, folder, "journal_1_nomlflow")
            real.append({"storage": "journal, MLflow off", **row})
            results["real"] = real

        simulated = []
        for label, value in storages.items():
            for workers in [int(w) for w in args.workers.split(",")]:
                row = simulated_throughput(value, str(folder), workers, seconds)
                simulated.append({"storage": label, **row})
                print(f"sim   {label:10s} workers={workers}: {row['trials_per_hour']:,.0f} trials/h", flush=True)
        results["simulated"] = simulated

        results["growth"] = {label: growth(value, str(folder), growth_trials, max(50, growth_trials // 6))
                             for label, value in storages.items()}
    finally:
        if mlflow is not None:
            mlflow.stop()
        if postgres is not None:
            postgres.cleanup()
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\n## Scaling ({os.cpu_count()} CPU cores)\n")
    if "real" in results:
        print("Real trials (tiny PiT, digits, 1 epoch, 8-cell grid; MLflow server on 127.0.0.1):\n")
        print(_table(results["real"], ["storage", "workers", "trials", "trials_per_hour", "mean_trial_s", "wall_s"]))
    print(f"\nSimulated trials (trivial objective, pitsearch's storage traffic per trial), {seconds:.0f} s each:\n")
    print(_table(results["simulated"], ["storage", "workers", "trials", "trials_per_hour", "ms_before_tell_p50",
                                        "ms_tell_p50", "ms_trial_p95"]))
    print("\nLatency as the study grows (one process; median ms per trial):\n")
    rows = {}
    for label, buckets in results["growth"].items():
        for bucket in buckets:
            row = rows.setdefault(bucket["trials"], {"trials": bucket["trials"]})
            row[f"{label} before tell"], row[f"{label} tell"] = bucket["ms_before_tell_p50"], bucket["ms_tell_p50"]
    print(_table(list(rows.values()), list(next(iter(rows.values())))))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
