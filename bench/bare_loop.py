"""The floor every orchestration tool is compared with: the sweep's grid as a plain script would run it.

An in-process Optuna grid (GridSampler over pool x seed, the sweep's cells) where each trial is a plain eager
AdamW loop over the sweep's model and data, both held on the device: no Hydra, no MLflow, no report, no worker
processes. It does less than a pitsearch trial (no augmentation, no LR schedule, no gradient clipping, no per-step
metrics) and its interpreter start and imports are not timed, so the floor is, if anything, too low.
"""

from __future__ import annotations

import time
from typing import Any

from sweep_runs import GpuBusySampler


def sweep_config(overrides: list[str], sweep: str = "pooling_ablation") -> dict[str, Any]:
    """The config `python -m pitsearch +sweep=<sweep> <overrides>` composes (model, data, train, sweep)."""
    from pitsearch.search.compose import TrialComposer

    return TrialComposer(overrides=[f"+sweep={sweep}", *overrides]).compose()


def run_bare_grid(cfg: dict[str, Any], device: str) -> dict:
    """Every pool x seed cell of `cfg`'s sweep, trained by `train_cell`; wall time includes loading the data."""
    import optuna
    import torch

    from pitsearch.data import load_dataset

    pools = list(cfg["sweep"]["space"]["model.pool"]["choices"])
    seeds = list(cfg["sweep"]["seeds"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    with GpuBusySampler() as sampler:
        dataset = load_dataset(cfg["data"], device=device)
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.GridSampler({"pool": pools, "seed": seeds}, seed=0))
        study.optimize(lambda trial: train_cell(cfg, dataset, trial.suggest_categorical("pool", pools),
                                                trial.suggest_categorical("seed", seeds)),
                       n_trials=len(pools) * len(seeds))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return {"status": "ok", "wall_s": wall, "gpu_busy": sampler.busy_fraction, "trials": len(study.trials),
            "val_acc_best": {f"{t.params['pool']}/{t.params['seed']}": t.value for t in study.trials}}


def train_cell(cfg: dict[str, Any], dataset, pool: str, seed: int) -> float:
    """One cell: build the model, train `train.epochs` epochs in eager mode (bf16 autocast on CUDA), evaluate
    after each epoch; returns the best validation accuracy."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from pitsearch.models import build_model

    train = cfg["train"]
    device = dataset.train_x.device
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    model = build_model(cfg["model"], pool=pool, img_size=dataset.img_size, in_chans=dataset.in_chans,
                        num_classes=dataset.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"], fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)
    n, batch = len(dataset.train_y), min(train["batch_size"], len(dataset.train_y))
    best = 0.0
    for _ in range(train["epochs"]):
        model.train()
        order = torch.randperm(n, device=device)
        for start in range(0, n - n % batch, batch):
            idx = order[start:start + batch]
            with autocast:
                logits = model((dataset.train_x[idx].float() / 255 - mean) / std)
            loss = F.cross_entropy(logits.float(), dataset.train_y[idx], label_smoothing=train["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.no_grad(), autocast:
            for start in range(0, len(dataset.val_y), train["eval_batch_size"]):
                x = dataset.val_x[start:start + train["eval_batch_size"]]
                y = dataset.val_y[start:start + train["eval_batch_size"]]
                correct += (model((x.float() / 255 - mean) / std).argmax(-1) == y).sum()
        best = max(best, correct.item() / len(dataset.val_y))
    return best
