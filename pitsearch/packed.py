"""Packed trials: K trials of one architecture and one training recipe trained as one stacked model.

Members may differ only in `train.seed`, `train.lr` and `train.weight_decay` (`pack_key` says which trials may
share a pack). Each member is the run `train_model` would make, member by member: its own initialisation (the
caller builds each model under its own seed, as `experiment.prepare` does), data order and augmentation (its own
generator, seeded as train.py seeds it), dropout draws (its own RNG), LR schedule, AdamW state, weight decay
and gradient clipping by its own global norm. A member whose callback raises (StopRun when pruned, any error)
or whose train loss is not finite (Diverged) leaves the pack at the end of that epoch; the others' numbers
do not change (members never mix in any op).

The stacked model, optimizer and attention handling live in pitsearch/packed_model.py. On a 2-core CPU packing
does not pay (K=3 vs 3 runs in a row, 2 threads: tiny test model 1.04x, pit_nano on 28 px 0.83x), so
`sweep.pack: auto` packs on CUDA only, where small models leave the device idle between kernels.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pitsearch.packed_model import PackedAdamW, PackedModel, clip_grad_norm_per_member
from pitsearch.retry import ServiceUnavailable
from pitsearch.train import METRIC_KEYS, Diverged, EpochCallback, TrainResult, _autocast, lr_scheduler

MEMBER_KEYS = ("seed", "lr", "weight_decay")  # train keys in which the members of one pack may differ
RUN_ONLY_KEYS = ("progress", "threads")      # train keys that do not change a run's numbers
PACKABLE_OPTIMIZERS = ("adamw",)             # PackedAdamW reproduces torch.optim.AdamW
AUTO_MAX_PACK = 8           # sweep.pack=auto never packs more members than this
MEMORY_FRACTION = 0.5       # share of the free device memory a pack may plan for
# Bytes kept per member parameter during a step: weights, gradient, two AdamW moments, ~3 step temporaries.
STATE_BYTES_PER_PARAM = 7 * 4
# fp32 values kept per token and channel of one transformer block in a training step. Autograd saves 17-18.5
# (saved_tensors_hooks on the tiny test model, pit_nano at 28 px, pit_ti at 32 px: LayerNorms, qkv, attention
# out, proj, fc1 and GELU at 4x width); 32 leaves room for the backward's temporaries.
ACTIVATION_FLOATS_PER_TOKEN_CHANNEL = 32


def pack_key(cfg: Mapping[str, Any]) -> str | None:
    """What must be equal for trials to share a pack (a JSON string over model, data and train minus the member
    keys), or None when the trial cannot be packed (an optimizer other than AdamW, torch.compile) or asks for
    a graph-captured step (`train.cuda_graph: on`: pitsearch.graphs captures one model's step, not a pack's)."""
    train = dict(cfg["train"])
    if (str(train.get("opt")).lower() not in PACKABLE_OPTIMIZERS or train.get("compile")
            or train.get("cuda_graph") == "on"):
        return None
    shared = {k: v for k, v in train.items() if k not in MEMBER_KEYS + RUN_ONLY_KEYS}
    return json.dumps({"model": cfg["model"], "data": cfg["data"], "train": shared}, sort_keys=True, default=str)


def estimate_member_bytes(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any]) -> int:
    """Peak training memory of one member, from the config alone: optimizer state plus saved activations."""
    from pitsearch.models.pit import NUM_CLS_TOKENS, stage_layout
    from pitsearch.profile import closed_form_params

    params = closed_form_params(dict(model_cfg))
    layout = stage_layout(model_cfg["img_size"], model_cfg["patch_size"], model_cfg["stride"], model_cfg["pool"],
                          len(model_cfg["depths"]))
    per_sample = 0
    for stage, depth, heads, head_dim in zip(layout, model_cfg["depths"], model_cfg["heads"], model_cfg["head_dims"]):
        tokens = stage["grid"][0] * stage["grid"][1] + NUM_CLS_TOKENS
        per_sample += depth * tokens * heads * head_dim * ACTIVATION_FLOATS_PER_TOKEN_CHANNEL
    per_sample += model_cfg["in_chans"] * model_cfg["img_size"] ** 2 * 2  # the augmented batch and its copy
    return params * STATE_BYTES_PER_PARAM + per_sample * 4 * int(train_cfg["batch_size"])


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pack_size(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], device: torch.device | str,
              cap: Any, free_bytes: int | None = None) -> int:
    """Members per pack for `sweep.pack` = `cap`: off (or 1) -> 1; auto -> on CUDA as many as fit, at most
    AUTO_MAX_PACK, else 1; N -> at most N on any device. "Fit" = MEMORY_FRACTION of the free memory (or of
    `free_bytes`, e.g. the free memory divided among a GPU's workers) over `estimate_member_bytes`."""
    device = torch.device(device)
    if cap in (None, False, "off"):
        return 1
    if cap == "auto":
        if device.type != "cuda":
            return 1
        limit = AUTO_MAX_PACK
    elif isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        limit = cap
    else:
        raise ValueError(f"sweep.pack must be auto, off or a positive integer, got {cap!r}")
    free = _free_bytes(device) if free_bytes is None else free_bytes
    fit = int(free * MEMORY_FRACTION) // max(1, estimate_member_bytes(model_cfg, train_cfg))
    return max(1, min(limit, fit))


def _check_shared(train_cfgs: Sequence[Mapping[str, Any]]) -> None:
    first = train_cfgs[0]
    for cfg in train_cfgs[1:]:
        for key in set(first) | set(cfg):
            if key not in MEMBER_KEYS + RUN_ONLY_KEYS and first.get(key) != cfg.get(key):
                raise ValueError(f"packed members differ in train.{key} ({first.get(key)!r} vs {cfg.get(key)!r}); "
                                 f"only {', '.join(MEMBER_KEYS)} may differ")
    if first.get("compile") or str(first["opt"]).lower() not in PACKABLE_OPTIMIZERS:
        raise ValueError("packed training needs train.opt=adamw and train.compile=false")


def _lr_schedules(train_cfgs: Sequence[Mapping[str, Any]], steps_per_epoch: int):
    """One timm CosineLRScheduler driving a stand-in optimizer with one param group per member, set up as
    train_model sets up its own (train.lr_scheduler); group m's lr is member m's lr."""
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": c["lr"]}
                                for c in train_cfgs])
    return lr_scheduler(stand_in, train_cfgs[0], steps_per_epoch), stand_in.param_groups


@torch.no_grad()
def evaluate_packed(packed: PackedModel, images: torch.Tensor, labels: torch.Tensor, augment, batch_size: int,
                    device: torch.device, precision: str = "auto") -> tuple[list[float], list[float]]:
    """`train.evaluate` for every member at once: per member (mean cross-entropy, top-1 accuracy)."""
    from pitsearch.data import batch_indices

    packed.train(False)
    loss_sum = torch.zeros(packed.size, device=device)
    correct = torch.zeros(packed.size, device=device, dtype=torch.long)
    for idx in batch_indices(len(labels), batch_size, None, device, drop_last=False):
        y = labels[idx]
        with _autocast(device, precision):
            logits = packed(augment.eval(images[idx]), shared_input=True)
        loss_sum += torch.stack([F.cross_entropy(member.float(), y, reduction="sum") for member in logits])
        correct += (logits.argmax(-1) == y).sum(-1)
    n = len(labels)
    return [value / n for value in loss_sum.tolist()], [value / n for value in correct.tolist()]


def train_packed(models: Sequence[nn.Module], dataset, train_cfgs: Sequence[Mapping[str, Any]],
                 aug_cfg: Mapping[str, Any] | None, callbacks: Sequence[Sequence[EpochCallback]] | None = None,
                 results: Sequence[TrainResult] | None = None) -> list[TrainResult | Exception]:
    """Train `models` (one architecture, on the dataset's device, each built under its own seed) as one pack.

    Returns one entry per member: its TrainResult, or the exception that ended it (StopRun / Diverged / a
    callback's error). `results`, when given, are filled in place epoch by epoch, as `train_model`'s `result`,
    so the curves of a member that stopped early are kept. The final weights are written back into `models`.
    An error in the shared forward or backward (e.g. out of memory) ends every member still in the pack with
    that error; their modules keep the weights they were built with. A lost server and Ctrl-C propagate.
    Timings (`time/epoch_s`, `perf/img_per_s`) are the pack's wall time: each member's own images per second.
    """
    import logging

    from pitsearch.augment import BatchAugment
    from pitsearch.data import batch_indices

    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)
    if not models:
        return []
    if len(train_cfgs) != len(models):
        raise ValueError(f"{len(models)} models but {len(train_cfgs)} train configs")
    _check_shared(train_cfgs)
    cfg = train_cfgs[0]
    callbacks = callbacks if callbacks is not None else [() for _ in models]
    device = dataset.train_x.device
    seeds = [int(c["seed"]) for c in train_cfgs]
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    label_smoothing = float(cfg["label_smoothing"])
    augment = BatchAugment(aug_cfg or {}, dataset, dataset.num_classes, label_smoothing=label_smoothing)

    n_train = len(dataset.train_y)
    batch_size = min(int(cfg["batch_size"]), n_train)
    steps_per_epoch = n_train // batch_size
    epochs = int(cfg["epochs"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    packed = PackedModel(models, seeds)
    optimizer = PackedAdamW(packed, cfg, [float(c["weight_decay"]) for c in train_cfgs])
    scheduler, lr_groups = _lr_schedules(train_cfgs, steps_per_epoch)
    grad_clip = float(cfg["grad_clip"])
    precision = str(cfg.get("precision") or "auto")

    results = list(results) if results is not None else [TrainResult() for _ in models]
    for result in results:
        result.history = {k: [] for k in METRIC_KEYS}
    outcomes: list[TrainResult | Exception | None] = [None] * len(models)
    val_acc_best = [0.0] * len(models)
    step = 0
    try:
        for epoch in range(epochs):
            members = list(packed.members)
            if not members:
                break
            packed.train(True)
            started = time.perf_counter()
            loss_sum = torch.zeros(len(members), device=device)
            correct = torch.zeros(len(members), device=device, dtype=torch.long)
            orders = [batch_indices(n_train, batch_size, generators[m], device, drop_last=True) for m in members]
            for _ in range(steps_per_epoch):
                images, targets, labels = [], [], []
                for m, order in zip(members, orders):
                    idx = next(order)
                    labels.append(dataset.train_y[idx])
                    x, target = augment.train(dataset.train_x[idx], labels[-1], generators[m])
                    images.append(x)
                    targets.append(target)
                with _autocast(device, precision):
                    logits = packed(torch.stack(images))
                # Soft targets (mixup/cutmix) already carry the smoothing timm's Mixup applied.
                smoothing = 0.0 if targets[0].ndim == 2 else label_smoothing
                losses = torch.stack([F.cross_entropy(member.float(), target, label_smoothing=smoothing)
                                      for member, target in zip(logits, targets)])
                packed.flat.grad = None
                losses.sum().backward()  # members share no weights: each gets exactly its own loss's gradient
                if grad_clip > 0:
                    clip_grad_norm_per_member(packed.flat, grad_clip)
                optimizer.step(packed.flat, [lr_groups[m]["lr"] for m in members])
                step += 1
                scheduler.step_update(step)
                loss_sum += losses.detach() * batch_size
                correct += (logits.detach().argmax(-1) == torch.stack(labels)).sum(-1)
            seen = steps_per_epoch * batch_size
            train_losses = [value / seen for value in loss_sum.tolist()]  # the epoch's one host sync
            train_accs = [value / seen for value in correct.tolist()]
            train_seconds = time.perf_counter() - started
            started_eval = time.perf_counter()
            val_losses, val_accs = evaluate_packed(packed, dataset.val_x, dataset.val_y, augment,
                                                   int(cfg["eval_batch_size"]), device, precision)
            eval_seconds = time.perf_counter() - started_eval

            leaving = []
            for row, m in enumerate(members):
                val_acc_best[m] = max(val_acc_best[m], val_accs[row])
                metrics = {
                    "train/loss": train_losses[row], "train/acc": train_accs[row], "val/loss": val_losses[row],
                    "val/acc": val_accs[row], "val/acc_best": val_acc_best[m], "gen/gap": train_accs[row] - val_accs[row],
                    "lr": lr_groups[m]["lr"], "time/epoch_s": time.perf_counter() - started,
                    "perf/img_per_s": seen / train_seconds,
                }
                result = results[m]
                for key in METRIC_KEYS:
                    result.history[key].append(metrics[key])
                result.epochs_run = epoch + 1
                result.train_seconds += train_seconds
                result.eval_seconds += eval_seconds
                try:
                    for callback in callbacks[m]:  # on a diverged epoch too, so trackers record it
                        callback(epoch, metrics)
                    if not math.isfinite(train_losses[row]):
                        raise Diverged(f"train/loss is {train_losses[row]} at epoch {epoch}")
                except ServiceUnavailable:
                    raise   # a lost server is the worker's to handle (pitsearch.search.pack), not this member's failure
                except Exception as error:  # noqa: BLE001 - StopRun, Diverged or a failing callback end this member only
                    outcomes[m] = error
                    leaving.append(row)
            if leaving:
                for row in leaving:
                    packed.write_back(row)
                staying = [row for row in range(len(members)) if row not in leaving]
                packed.keep(staying)
                optimizer.keep(staying)
    except ServiceUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - the shared step failed (e.g. out of memory): every member in it
        for m in packed.members:   # members that left earlier keep their outcome; these still hold their init
            outcomes[m] = error     # weights (write_back was never called), so a caller may train them alone
        return outcomes

    for row, m in enumerate(packed.members):
        packed.write_back(row)
        outcomes[m] = results[m]
    return outcomes
