"""The short-run training loop: one model, one dataset held on the device, per-epoch metrics to callbacks.

Reads top to bottom like nanoGPT's loop. Batches are index slices of a per-epoch permutation of tensors that
already live on the training device; running sums stay on the device and are read once per epoch, so a GPU
step never waits on the host. The only extension point is the per-epoch callback list.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from pitsearch.errors import ConfigError
from pitsearch.runstate import Diverged

EpochCallback = Callable[[int, dict[str, float]], None]

# Order in which per-epoch metrics are printed and logged.
METRIC_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "gen/gap", "lr",
               "time/epoch_s", "perf/img_per_s")


@dataclass
class TrainResult:
    history: dict[str, list[float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    compile_seconds: float = 0.0   # the first torch.compile'd step, or the CUDA graph captures (0 without either)
    epochs_run: int = 0

    @property
    def final(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.history.items() if v}


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{name!r} asked for, but CUDA is not available on this machine")
    return device


def validate_train_config(cfg: Mapping[str, Any], aug_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Types, unknown keys, defaults and ranges are TrainConfig's (pitsearch.config.schema); checked here: what
    needs torch or timm, and what `train.cuda_graph=on` needs of the train keys and the data's `aug_cfg`.
    Returns the full config."""
    from pitsearch.config import checked

    cfg = checked("train", cfg)
    if not -2**63 <= cfg["seed"] < 2**64:   # the range torch.manual_seed accepts
        raise ConfigError("train.seed", f"must be an integer (64-bit), got {cfg['seed']!r}")
    from timm.optim import list_optimizers

    if str(cfg["opt"]).lower() not in set(list_optimizers()):
        raise ConfigError("train.opt", f"unknown optimizer {cfg['opt']!r}; timm knows e.g. adamw, adamp, lamb, sgd")
    device = resolve_device(cfg["device"])
    if cfg["cuda_graph"] == "on":   # refused here, before any data is loaded, rather than when training starts
        from pitsearch.graphs import use_cuda_graphs

        use_cuda_graphs(cfg, aug_cfg, device)
    return cfg


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str = "auto", cache: bool = True):
    """bf16 autocast on CUDA unless fp32 is asked for; fp32 on CPU (bf16 brings no speed there, measured).
    `cache=False` inside a CUDA graph capture (torch.cuda.make_graphed_callables asks the same of autocast)."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment, batch_size: int,
             device: torch.device, precision: str = "auto") -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) over a whole split, summed on the device and read once."""
    from pitsearch.data import batch_indices

    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for idx in batch_indices(len(labels), batch_size, None, device, drop_last=False):
        x = augment.eval(images[idx])
        y = labels[idx]
        with _autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    n = len(labels)
    return loss_sum.item() / n, correct.item() / n


def lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Mapping[str, Any], steps_per_epoch: int):
    """timm's cosine schedule, stepped per batch: linear warmup over `warmup_epochs` from `warmup_lr`, then cosine
    from each param group's lr down to `min_lr` by the end of `epochs`."""
    from timm.scheduler import CosineLRScheduler

    warmup_steps = int(round(float(train_cfg["warmup_epochs"]) * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, int(train_cfg["epochs"]) * steps_per_epoch - warmup_steps),
                             lr_min=train_cfg["min_lr"], warmup_t=warmup_steps, warmup_lr_init=train_cfg["warmup_lr"],
                             warmup_prefix=True, t_in_epochs=False)


def train_model(model: torch.nn.Module, dataset, train_cfg: Mapping[str, Any], aug_cfg: Mapping[str, Any] | None,
                callbacks: Iterable[EpochCallback] = (), console=None,
                result: TrainResult | None = None) -> TrainResult:
    """Train `model` on `dataset` (a `pitsearch.data.Dataset` on the training device) for `train.epochs`.

    Each epoch calls every callback with (epoch, metrics); a callback raises `StopRun` to end early. Pass
    `result` to keep the curves of a run that stops early or fails: it is filled in place, epoch by epoch.
    """
    import logging

    from timm.optim import create_optimizer_v2
    from pitsearch.augment import BatchAugment
    from pitsearch.data import batch_indices
    from pitsearch.graphs import CapturedEval, CapturedTrainStep, use_cuda_graphs

    # A 1-epoch run is all warmup; timm then warns that the cosine part is empty, which is expected here.
    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)

    device = dataset.train_x.device
    seed = int(train_cfg["seed"])
    torch.manual_seed(seed)  # drop path and any other global-RNG use inside the model
    generator = torch.Generator(device=device).manual_seed(seed)
    augment = BatchAugment(aug_cfg or {}, dataset, dataset.num_classes,
                           label_smoothing=float(train_cfg["label_smoothing"]))

    n_train = len(dataset.train_y)
    batch_size = min(int(train_cfg["batch_size"]), n_train)
    steps_per_epoch = n_train // batch_size  # drop_last: every step sees a full batch
    epochs = int(train_cfg["epochs"])
    graphs = use_cuda_graphs(train_cfg, aug_cfg, device)
    optimizer_kwargs = {}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if str(train_cfg["opt"]).lower() in ("adam", "adamw"):
            optimizer_kwargs["fused"] = True  # one kernel for the whole update instead of one per tensor
            optimizer_kwargs["capturable"] = graphs   # its step counts on the device, its lr a tensor
    optimizer = create_optimizer_v2(model, opt=train_cfg["opt"], lr=train_cfg["lr"],
                                    weight_decay=train_cfg["weight_decay"], **optimizer_kwargs)
    scheduler = lr_scheduler(optimizer, train_cfg, steps_per_epoch)
    step_model = torch.compile(model) if train_cfg.get("compile") else model
    compile_pending = bool(train_cfg.get("compile"))
    grad_clip = float(train_cfg["grad_clip"])
    precision = str(train_cfg.get("precision") or "auto")
    label_smoothing = float(train_cfg["label_smoothing"])
    captured_step = captured_eval = None
    if graphs:
        graph_autocast = functools.partial(_autocast, device, precision, cache=False)
        captured_step = CapturedTrainStep(model, optimizer, augment, dataset.train_x, dataset.train_y, batch_size,
                                          label_smoothing=label_smoothing, grad_clip=grad_clip,
                                          autocast=graph_autocast)
        captured_eval = CapturedEval(model, augment, dataset.val_x, dataset.val_y,
                                     int(train_cfg["eval_batch_size"]), autocast=graph_autocast)

    result = result if result is not None else TrainResult()
    result.history = {k: [] for k in METRIC_KEYS}
    progress = _Progress(console, epochs, steps_per_epoch) if train_cfg.get("progress", True) else None
    val_acc_best = 0.0
    step = 0
    try:
        for epoch in range(epochs):
            model.train()
            started = time.perf_counter()
            if captured_step is not None:
                loss_sum, correct = captured_step.start_epoch()   # the device sums its graph adds to
            else:
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
            for idx in batch_indices(n_train, batch_size, generator, device, drop_last=True):
                if captured_step is not None:
                    captured_step(idx, generator)
                    step += 1
                    scheduler.step_update(step)   # lr floats; the step copies them into its lr tensors
                    if progress:
                        progress.batch()
                    continue
                labels = dataset.train_y[idx]
                x, targets = augment.train(dataset.train_x[idx], labels, generator)
                first_compiled_step = compile_pending
                if first_compiled_step:
                    compile_started = time.perf_counter()
                with _autocast(device, precision):
                    logits = step_model(x)
                # Soft targets (mixup/cutmix) already carry the smoothing timm's Mixup applied.
                smoothing = 0.0 if targets.ndim == 2 else label_smoothing
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                if first_compiled_step:  # the first call of a compiled model compiles forward and backward
                    _synchronize(device)
                    result.compile_seconds = time.perf_counter() - compile_started
                    compile_pending = False
                step += 1
                scheduler.step_update(step)
                loss_sum += loss.detach() * len(labels)
                correct += (logits.detach().argmax(-1) == labels).sum()
                if progress:
                    progress.batch()
            seen = steps_per_epoch * batch_size
            train_loss = loss_sum.item() / seen  # the epoch's one host sync for training metrics
            train_acc = correct.item() / seen
            train_seconds = time.perf_counter() - started
            result.train_seconds += train_seconds

            started_eval = time.perf_counter()
            if captured_eval is not None:
                val_loss, val_acc = captured_eval()
                result.compile_seconds = captured_step.capture_seconds + captured_eval.capture_seconds
            else:
                val_loss, val_acc = evaluate(model, dataset.val_x, dataset.val_y, augment,
                                             int(train_cfg["eval_batch_size"]), device, precision)
            result.eval_seconds += time.perf_counter() - started_eval
            val_acc_best = max(val_acc_best, val_acc)
            metrics = {
                "train/loss": train_loss, "train/acc": train_acc, "val/loss": val_loss, "val/acc": val_acc,
                "val/acc_best": val_acc_best, "gen/gap": train_acc - val_acc,
                "lr": optimizer.param_groups[0]["lr"], "time/epoch_s": time.perf_counter() - started,
                "perf/img_per_s": seen / train_seconds,
            }
            for key in METRIC_KEYS:
                result.history[key].append(metrics[key])
            result.epochs_run = epoch + 1
            if progress:
                progress.epoch(epoch, metrics)
            if not math.isfinite(train_loss):
                for callback in callbacks:  # let trackers record the diverged epoch before stopping
                    callback(epoch, metrics)
                raise Diverged(f"train/loss is {train_loss} at epoch {epoch}")
            for callback in callbacks:
                callback(epoch, metrics)
    finally:
        if progress:
            progress.close()
    return result


class _Progress:
    """A rich bar over epochs and batches plus one summary line per epoch."""

    def __init__(self, console, epochs: int, steps_per_epoch: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from pitsearch.console import make_console

        self.console = console or make_console()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=self.console, transient=True)
        self.epochs_task = self.bar.add_task("epochs", total=epochs)
        self.batches_task = self.bar.add_task("batches", total=steps_per_epoch)
        self.bar.start()

    def batch(self) -> None:
        self.bar.advance(self.batches_task)

    def epoch(self, epoch: int, m: Mapping[str, float]) -> None:
        self.bar.advance(self.epochs_task)
        self.bar.reset(self.batches_task)
        self.console.print(
            f"epoch {epoch:3d}  train/loss {m['train/loss']:.4f}  train/acc {m['train/acc']:.4f}  "
            f"val/acc {m['val/acc']:.4f}  best {m['val/acc_best']:.4f}  gap {m['gen/gap']:+.4f}  "
            f"lr {m['lr']:.2e}  {m['time/epoch_s']:.1f}s  {m['perf/img_per_s']:.0f} img/s")

    def close(self) -> None:
        self.bar.stop()
