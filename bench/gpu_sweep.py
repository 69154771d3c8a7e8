"""GPU sweep throughput: how fast a pooling hypothesis is answered on one machine, against the issue's targets.

One run measures, side by side, and prints one table (and writes JSON with --json PATH):
  1. the default ablation (`python -m pitsearch +sweep=pooling_ablation`, a fresh process per run): wall time from
     the command to the report, GPU busy %, per-trial overhead (trial wall - train - eval, from the trials' user
     attributes; a pack's overhead is shared by its members), packed vs unpacked (`sweep.pack=auto|off`) and CUDA
     graphs on vs off (`train.cuda_graph=on|off`; rows without the key when this checkout's schema lacks it);
  2. the bare eager loop (bench/bare_loop.py): the same grid as an in-process Optuna loop with plain eager AdamW
     steps, the floor any orchestration is compared with; "x vs bare" = bare wall / sweep wall;
  3. the ablation on 50,000 synthetic 32 px images for 8 epochs, packed vs unpacked;
  4. pit_s training at 224 px, batch 64, bf16: pitsearch vs timm's pit_s_224, each eager and torch.compile'd
     (bench/train_step.py), and the MFU of pitsearch's (MACs x 2 x 3 x img/s / peak bf16 FLOP/s);
  5. PASS / FAIL beside each figure that has a target (TARGETS).
Measurements run most important first; past --deadline-s the rest are skipped (the GPU script's budget), and the
JSON is rewritten after each one, so a run cut short keeps what it measured.

    python bench/gpu_sweep.py [--json PATH] [--deadline-s 400] [--ks 2,4] [--skip-large] [--peak-tflops 989]
    python bench/gpu_sweep.py --cpu-smoke     # the same code paths on a CPU, tiny budgets (checks the script)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/ modules, however the script is started

from bare_loop import run_bare_grid, sweep_config  # noqa: E402
from sweep_runs import run_sweep  # noqa: E402

# Dense bf16 peak by GPU name (no sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
# Issue 16's targets: figure -> (comparison, threshold).
TARGETS = {"ablation_wall_s": ("<=", 15.0), "gpu_busy": (">=", 0.60), "x_vs_bare": (">=", 3.0),
           "overhead_s": ("<=", 0.3), "synthetic_wall_s": ("<=", 60.0), "x_vs_timm_eager": (">=", 1.3)}


@dataclass
class Budget:
    ablation: list[str]          # overrides of every default-ablation run (and of the bare loop's config)
    synthetic: list[str]         # overrides of the large-data runs
    packed: str                  # sweep.pack of the packed rows
    graph_on: str                # train.cuda_graph of the graph rows (on; auto where graphs cannot run)
    preset: str                  # item 4's model, at img_size
    img_size: int
    batch: int
    rounds: int
    steps: int
    compile_backend: str
    sweep_timeout_s: float
    common: list[str] = field(default_factory=lambda: ["tracking.experiment=bench_gpu_sweep"])


GPU = Budget(ablation=[], packed="auto", graph_on="on",
             synthetic=["data=synthetic", "data.num_train=50000", "data.img_size=32", "train.epochs=8"],
             preset="pit_s", img_size=224, batch=64, rounds=3, steps=10, compile_backend="inductor",
             sweep_timeout_s=150)
# Tiny: 1 epoch, 2 seeds, the 8x8 digits, a small PiT at 64 px; packs of 2 (auto packs on CUDA only); graphs
# auto (on is refused without CUDA; auto takes the fallback path); compile through dynamo with the eager backend
# (no C++ build on a 2-core machine).
SMOKE = Budget(ablation=["train.epochs=1", "train.batch_size=256", "data=digits", "model.patch_size=2",
                         "model.stride=1", "sweep.seeds=[0,1]", "train.device=cpu"],
               synthetic=["data=synthetic", "data.num_train=256", "data.num_val=64", "data.img_size=16",
                          "train.epochs=1", "train.batch_size=64", "sweep.seeds=[0,1]", "train.device=cpu"],
               packed="2", graph_on="auto", preset="pit_ti", img_size=64, batch=4, rounds=1, steps=2, compile_backend="eager",
               sweep_timeout_s=300)


def check(figure: str, value) -> bool | None:
    if value is None or figure not in TARGETS:
        return None
    op, threshold = TARGETS[figure]
    return value <= threshold if op == "<=" else value >= threshold


def ablation_rows(budget: Budget) -> tuple[list[tuple[str, list[str]]], str | None]:
    """(label, overrides) per ablation run, the run as typed (no pack / graph override) first, and a note when
    this checkout's train schema has no cuda_graph key (then the rows differ in packing only)."""
    from pitsearch.errors import ConfigError

    typed = sweep_config(budget.ablation)
    try:
        sweep_config(budget.ablation + ["train.cuda_graph=off"])
        graphs, note = (budget.graph_on, "off"), None
    except ConfigError as error:
        graphs, note = (None,), f"graph rows skipped: the CLI refuses train.cuda_graph ({error})"
    pack = typed["sweep"]["pack"]
    as_typed = ("off" if pack in (False, "off") else str(pack), typed["train"].get("cuda_graph"))
    rows, defaults_matched = [], False
    for pack in (budget.packed, "off"):
        for graph in graphs:
            label = f"ablation pack={pack}" + (f" graph={graph}" if graph else "")
            if (pack, graph) == as_typed or (graph is None and pack == as_typed[0]):
                label, defaults_matched = label + " (as typed)", True
            rows.append((label, [f"sweep.pack={pack}"] + ([f"train.cuda_graph={graph}"] if graph else [])))
    rows.sort(key=lambda row: "(as typed)" not in row[0])
    if not defaults_matched:
        rows.insert(0, ("ablation as typed (no overrides)", []))
    return rows, note


def measure(args, budget: Budget, device: str, record) -> None:
    """Every measurement, most important first; `record(key, figures)` keeps each as it finishes."""
    started = time.perf_counter()
    left = lambda: args.deadline_s - (time.perf_counter() - started)  # noqa: E731
    rows, note = ablation_rows(budget)
    if note:
        print(note)
    runs = [(label, "ablation", budget.ablation + overrides) for label, overrides in rows]
    if not args.skip_large:
        runs += [(f"synthetic pack={pack}", "synthetic", budget.synthetic + [f"sweep.pack={pack}"])
                 for pack in (budget.packed, "off")]
    workers = "sweep.trials_per_gpu" if device == "cuda" else "sweep.n_workers"
    runs += [(f"ablation {workers}={k}", "ablation", budget.ablation + [f"{workers}={k}"])
             for k in (int(k) for k in args.ks.split(",") if k)]
    # Order: the sweep as typed, the bare loop, the other ablation rows, pit_s, the large-data and K rows.
    order = runs[:1] + [("bare eager loop (Optuna grid)", "bare", None)] + runs[1:len(rows)] \
        + [("pit_s", "pit_s", None)] + runs[len(rows):]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kind, overrides) in enumerate(order):
            if left() < {"bare": 60, "pit_s": 150}.get(kind, 20):   # pit_s: two torch.compile builds
                record(label, kind, {"status": "skipped", "note": f"out of time (--deadline-s {args.deadline_s:.0f})"})
            elif kind == "bare":
                record(label, kind, run_bare_grid(sweep_config(budget.ablation), device))
            elif kind == "pit_s":
                import torch
                from train_step import bench_preset_vs_timm

                record(label, kind, bench_preset_vs_timm(torch.device(device), budget.preset, budget.img_size,
                                                         budget.batch, budget.rounds, budget.steps,
                                                         budget.compile_backend))
            else:
                study = f"bench_{i}"
                record(label, kind, run_sweep([f"sweep.study_name={study}", *budget.common, *overrides],
                                              Path(tmp) / study, min(budget.sweep_timeout_s, left())))


def sweep_checks(kind: str, figures: dict, bare_wall: float | None) -> dict:
    """The figures of one sweep row that have targets, with the bare-loop ratio filled in."""
    if figures.get("status") == "ok" and kind == "ablation" and bare_wall:   # the bare loop runs this data only
        figures["x_vs_bare"] = bare_wall / figures["wall_s"]
    wall_target = {"ablation": "ablation_wall_s", "synthetic": "synthetic_wall_s"}.get(kind)
    checks = {"wall_s": check(wall_target, figures.get("wall_s")) if wall_target else None,
              "gpu_busy": check("gpu_busy", figures.get("gpu_busy")) if kind == "ablation" else None,
              "x_vs_bare": check("x_vs_bare", figures.get("x_vs_bare")) if kind == "ablation" else None,
              "overhead_s": check("overhead_s", figures.get("overhead_s")) if kind == "ablation" else None}
    if figures.get("status") == "timeout" and wall_target:
        checks["wall_s"] = False
    return {k: v for k, v in checks.items() if v is not None}


def cell(value, fmt: str, ok: bool | None, width: int) -> str:
    text = "n/a" if value is None else format(value, fmt)
    return (text + ("" if ok is None else " PASS" if ok else " FAIL")).ljust(width)


def print_table(results: dict, peak: float | None, budget: Budget) -> None:
    targets = ", ".join(f"{k} {op} {v:g}" for k, (op, v) in TARGETS.items())
    print(f"\ntargets (issue 16): {targets}")
    print(f"{'run':44s}{'trials':>7s}{'packs':>6s}  {'wall s':14s}{'GPU busy':14s}{'x vs bare':14s}"
          f"{'overhead s/trial':18s}{'img/s/trial':>11s}")
    rank = {"ablation": 0, "bare": 1, "synthetic": 2}
    for label, row in sorted(results.items(), key=lambda item: rank.get(item[1]["kind"], 3)):
        if row["kind"] == "pit_s":
            continue
        f, c = row["figures"], row["checks"]
        if f.get("status") not in ("ok", "timeout"):
            print(f"{label:44s}  {f['status']}: {f.get('note', '')[:160]}")
            continue
        wall = (">" if f["status"] == "timeout" else "") + f"{f['wall_s']:.1f}"
        print(f"{label:44s}{f.get('trials', '-')!s:>7s}{f.get('packs', '-')!s:>6s}  "
              + (wall + ("" if "wall_s" not in c else " PASS" if c["wall_s"] else " FAIL")).ljust(14)
              + cell(f.get("gpu_busy"), ".0%", c.get("gpu_busy"), 14)
              + cell(f.get("x_vs_bare"), ".2f", c.get("x_vs_bare"), 14)
              + cell(f.get("overhead_s"), ".3f", c.get("overhead_s"), 18)
              + (f"{f['img_per_s']:>11,.0f}" if f.get("img_per_s") else f"{'-':>11s}"))
    row = results.get("pit_s")
    if row is None:
        return
    f = row["figures"]
    print(f"\n{budget.preset} {budget.img_size} px training step, batch {budget.batch}, bf16 autocast on CUDA "
          f"(compile backend {budget.compile_backend}){'img/s':>12s}  x timm eager")
    if f.get("status") == "skipped":
        print(f"  skipped: {f['note']}")
        return
    for name, rate in f["img_per_s"].items():
        ratio = rate / f["img_per_s"]["timm eager"]
        ok = row["checks"].get(name)
        print(f"  {name:80s}{rate:>9,.0f}  {ratio:.2f}x" + ("" if ok is None else " PASS" if ok else " FAIL"))
    if peak:
        print(f"  MFU of pitsearch compiled: {f['mfu']:.1%} of {peak:.0f} TFLOP/s bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write every figure here (rewritten after each)")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip measurements that start after this")
    parser.add_argument("--ks", default="", help="also: the ablation with K workers per GPU, e.g. 2,4")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (TFLOP/s)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 50k-image synthetic ablation")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny budgets on the CPU: checks the script runs")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device, budget = ("cuda", GPU) if cuda else ("cpu", SMOKE)
    gpu_name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke run: not GPU figures; PASS/FAIL shown anyway)"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)
    print(f"device: {gpu_name}; torch {torch.__version__}")
    results: dict = {}

    def record(label: str, kind: str, figures: dict) -> None:
        if kind == "pit_s" and "img_per_s" in figures:
            rates = figures["img_per_s"]
            checks = {name: check("x_vs_timm_eager", rate / rates["timm eager"])
                      for name, rate in rates.items() if name.startswith("pitsearch")}
            figures["mfu"] = figures["macs"] * 2 * 3 * rates["pitsearch compiled"] / (peak * 1e12) if peak else None
        else:
            bare = results.get("bare eager loop (Optuna grid)", {}).get("figures", {}).get("wall_s")
            checks = sweep_checks(kind, figures, bare)
        results[label] = {"kind": kind, "figures": figures, "checks": checks}
        print(f"{label}: {json.dumps(figures, default=str)[:300]}", flush=True)
        write_json()

    def write_json() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"device": gpu_name, "torch": torch.__version__, "smoke": args.cpu_smoke,
                                             "targets": TARGETS, "results": results}, indent=1, default=str))

    measure(args, budget, device, record)
    bare = results.get("bare eager loop (Optuna grid)", {}).get("figures", {}).get("wall_s")
    for row in results.values():   # rows measured before the bare loop get their ratio now
        if row["kind"] in ("ablation", "synthetic"):
            row["checks"] = sweep_checks(row["kind"], row["figures"], bare)
    write_json()
    print_table(results, peak, budget)


if __name__ == "__main__":
    main()
