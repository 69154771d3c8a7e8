"""GPU sweep throughput: how fast a pooling hypothesis is answered on one machine.

Prints, for the default `pooling_ablation` (same epochs as on CPU) and a larger-data variant (synthetic
CIFAR-size data, 50k images):
  - wall time of the whole sweep, from the command to the final report (a fresh `python -m pitsearch` process);
  - per-trial overhead (trial wall time minus train + eval time) and images/s per trial;
  - GPU busy fraction over the sweep (nvidia-ml-py when installed, else torch.cuda.utilization);
  - trials/hour for K = 1, 2, 4, 8 workers per GPU (`sweep.trials_per_gpu=K`);
then the training step of pitsearch's PiT vs timm's (`ratio_vs_timm`, from bench/train_step.py) and the model
FLOPs utilisation of a pit_s training step at 224 px in bf16: MACs x 2 x 3 x images/s / peak bf16 FLOP/s.

    python bench/gpu_sweep.py [--ks 1,2,4,8] [--peak-tflops 989] [--skip-large]
    python bench/gpu_sweep.py --cpu-smoke     # the same code paths on a CPU, tiny budgets (checks the script)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Dense bf16 peak by GPU name (no sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


class GpuBusySampler:
    """Samples GPU utilisation every 0.2 s in a thread; busy fraction = mean utilisation / 100."""

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
        while not self._stop.wait(0.2):
            if self._read is not None:
                self.samples.append(self._read())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def busy_fraction(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def run_sweep(overrides: list[str], workdir: Path) -> dict:
    """One fresh `python -m pitsearch +sweep=pooling_ablation ...` process; returns its figures."""
    started = time.perf_counter()
    with GpuBusySampler() as sampler:
        result = subprocess.run([sys.executable, "-m", "pitsearch", "+sweep=pooling_ablation", *overrides],
                                cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"sweep failed ({result.returncode}):\n{result.stderr[-3000:]}")
    import optuna

    from pitsearch.search.storage import make_storage

    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("sweep.study_name="))
    study = optuna.load_study(study_name=name, storage=make_storage(None, workdir / "pitsearch-sweeps" / name))
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    overheads = [t.user_attrs["wall_seconds"] - t.user_attrs["train_seconds"] - t.user_attrs["eval_seconds"]
                 for t in trials]
    img_s = [t.user_attrs["final"]["perf/img_per_s"] for t in trials]
    return {"wall_s": wall, "trials": len(trials), "trials_per_hour": len(trials) / wall * 3600,
            "overhead_s_mean": sum(overheads) / len(overheads), "img_per_s_mean": sum(img_s) / len(img_s),
            "gpu_busy": sampler.busy_fraction}


def mfu_pit_s(device: str, peak_tflops: float, batch: int, steps: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from pitsearch.models import build_model
    from pitsearch.profile import model_stats

    model = build_model("pit_s")
    macs = model_stats(model, 224)["macs"]
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    img_s = steps * batch / (time.perf_counter() - started)
    return img_s, macs * 2 * 3 * img_s / (peak_tflops * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,8", help="workers per GPU to measure")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (TFLOP/s)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 50k-image synthetic variant")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny budgets on the CPU: checks the script runs")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    import torch

    from train_step import bench_steps

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = "cuda" if cuda else "cpu"
    gpu_name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke run, not a GPU figure)"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)
    print(f"device: {gpu_name}; torch {torch.__version__}")
    smoke = ["train.epochs=1", "train.batch_size=256", "data=digits", "model.patch_size=2", "model.stride=1",
             "sweep.seeds=[0]"] if args.cpu_smoke else []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(k) for k in args.ks.split(",")]:
            workdir = Path(tmp) / f"k{k}"
            workdir.mkdir()
            overrides = [f"sweep.study_name=bench_k{k}", "tracking.experiment=bench_gpu_sweep"] + smoke
            overrides += [f"sweep.trials_per_gpu={k}"] if cuda else [f"sweep.n_workers={k}"]
            results[f"pooling_ablation_K{k}"] = figures = run_sweep(overrides, workdir)
            print(f"pooling_ablation K={k}: wall {figures['wall_s']:.1f}s for {figures['trials']} trials "
                  f"({figures['trials_per_hour']:.0f} trials/h), overhead/trial {figures['overhead_s_mean']:.2f}s, "
                  f"{figures['img_per_s_mean']:.0f} img/s/trial, GPU busy "
                  + (f"{figures['gpu_busy']:.0%}" if figures["gpu_busy"] is not None else "n/a"))
        if not args.skip_large:
            workdir = Path(tmp) / "large"
            workdir.mkdir()
            size = ["data.num_train=2000", "data.num_val=500"] if args.cpu_smoke else []
            overrides = ["sweep.study_name=bench_large", "tracking.experiment=bench_gpu_sweep", "data=synthetic",
                         "train.epochs=2", *size, *smoke[:2]]
            results["synthetic_50k"] = figures = run_sweep(overrides, workdir)
            print(f"synthetic CIFAR-size ({'2k' if args.cpu_smoke else '50k'} images) pooling_ablation: wall "
                  f"{figures['wall_s']:.1f}s, overhead/trial {figures['overhead_s_mean']:.2f}s, "
                  f"{figures['img_per_s_mean']:.0f} img/s/trial, GPU busy "
                  + (f"{figures['gpu_busy']:.0%}" if figures["gpu_busy"] is not None else "n/a"))
    ours, timm_rate = bench_steps(torch.device(device), rounds=3 if args.cpu_smoke else 5,
                                  steps=2 if args.cpu_smoke else 20, batch=128)
    results["ratio_vs_timm"] = ours / timm_rate
    print(f"training step: pitsearch {ours:.0f} img/s, timm {timm_rate:.0f} img/s")
    img_s, mfu = mfu_pit_s(device, peak or 1.0, batch=2 if args.cpu_smoke else 256, steps=1 if args.cpu_smoke else 20)
    results["pit_s_bf16_img_per_s"] = img_s
    results["pit_s_bf16_mfu"] = mfu if peak else None
    print(f"pit_s 224 bf16 training: {img_s:.0f} img/s, MFU " + (f"{mfu:.1%} of {peak:.0f} TFLOP/s" if peak else "n/a (peak unknown)"))
    print("json=" + json.dumps(results))
    print(f"ratio_vs_timm={ours / timm_rate:.3f}")


if __name__ == "__main__":
    main()
