"""One sweep as a user runs it, measured from outside: a fresh `python -m pitsearch` process, its wall time from the
command to the report, the GPU's busy fraction meanwhile, and the per-trial figures the trials stored in the study.

Used by bench/gpu_sweep.py; the GPU sampler is shared with the bare loop (bench/bare_loop.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class GpuBusySampler:
    """Samples GPU utilisation every 0.2 s in a thread; busy fraction = mean utilisation / 100 (None without a GPU)."""

    def __init__(self, device_index: int = 0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._read = self._reader(device_index)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _reader(index):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - fall back to torch's reading (which uses NVML too)
            import torch

            if not torch.cuda.is_available():
                return None
            return lambda: float(torch.cuda.utilization(index))

    def _loop(self):
        while self._read is not None and not self._stop.wait(0.2):
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a driver that will not say: no figure rather than a dead thread
                self._read = None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def busy_fraction(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def run_sweep(overrides: list[str], workdir: Path, timeout_s: float, sweep: str = "pooling_ablation") -> dict:
    """One fresh `python -m pitsearch +sweep=<sweep> ...` process in `workdir`; returns its figures, or
    {"status": "skipped" | "failed" | "timeout", "note": why} (a refused `train.cuda_graph` key is "skipped")."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pitsearch", f"+sweep={sweep}", *overrides]
    started = time.perf_counter()
    with GpuBusySampler() as sampler:
        # Its own process group, so a sweep stopped at its time limit takes its worker processes with it.
        process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"status": "timeout", "note": f"stopped after {timeout_s:.0f} s", "wall_s": timeout_s,
                    "gpu_busy": sampler.busy_fraction}
    wall = time.perf_counter() - started
    if process.returncode != 0:
        said = (stderr.strip() or stdout.strip() or "no output").splitlines()[-1]
        if "cuda_graph" in said:
            return {"status": "skipped", "note": f"the CLI refused train.cuda_graph: {said}"}
        return {"status": "failed", "note": f"exit {process.returncode}: {said}"}
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("sweep.study_name="))
    return {"status": "ok", "wall_s": wall, "gpu_busy": sampler.busy_fraction,
            **trial_figures(workdir / "pitsearch-sweeps" / name, name)}


def trial_figures(folder: Path, study_name: str) -> dict:
    """Per-trial figures from the study's user attributes (pitsearch.search.trial._record).

    The members of a pack (sweep.pack) record the pack's wall, train and eval seconds, so the overhead of a pack
    (wall - train - eval) is counted once and shared by its members: overhead per trial = sum over packs / trials.
    """
    import optuna

    from pitsearch.search.storage import make_storage

    study = optuna.load_study(study_name=study_name, storage=make_storage(None, folder))
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not trials:
        return {"trials": 0, "packs": 0, "overhead_s": None, "img_per_s": None}
    packs: dict[tuple[float, float], float] = {}   # (train s, eval s) of a pack -> its longest member wall
    for t in trials:
        key = (t.user_attrs["train_seconds"], t.user_attrs["eval_seconds"])
        packs[key] = max(packs.get(key, 0.0), t.user_attrs["wall_seconds"])
    overhead = sum(wall - train - evaluation for (train, evaluation), wall in packs.items())
    img_s = [t.user_attrs["final"]["perf/img_per_s"] for t in trials]
    return {"trials": len(trials), "packs": len(packs), "overhead_s": overhead / len(trials),
            "img_per_s": sum(img_s) / len(img_s)}
