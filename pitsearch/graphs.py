"""Training steps and eval forwards replayed as CUDA graphs (`train.cuda_graph`), for small models whose eager
step is bound by kernel launches: one replay launches the whole step at once.

What a graph holds and what stays outside it:

- `CapturedTrainStep`: forward, loss, backward, gradient clipping and the AdamW step (fused, `capturable=True`,
  its step counts on the device), plus the epoch's loss / correct sums. The learning rate is one device tensor per
  param group, filled from the scheduler's float before every step (timm's scheduler writes floats into
  `param_group["lr"]`; the tensor goes in only while a step is captured or warmed up, so the floats the scheduler
  and the metrics read stay as they are).
- Outside: the batch's gather and random crop / flip, written into static uint8 buffers the graph reads. They draw
  from the run's own `torch.Generator` exactly as an eager step does, so the captured run sees the same batches.
  (`CUDAGraph.register_generator_state` would let them join the graph; they are a few small kernels queued while
  the previous replay runs, so that waits for the benchmark to show it matters.) Dropout and drop path draw from
  the default CUDA generator, which `torch.cuda.graph` registers itself: every replay draws fresh numbers.
- `CapturedEval`: `train.evaluate`'s loop with its full batches replayed; a last partial batch runs eagerly.

Following torch's recipe, the first `WARMUP_STEPS` steps run eagerly on a side stream (real steps: they train and
count), which also creates the optimizer's state; the next one is captured, with grads set to None so backward
allocates them inside the graph's pool, and replayed from then on. Replays run the same kernels in the same order,
so a seed gives the same curves run after run on one machine, as eager steps do. With `capture=False` (or on the
CPU) both classes run their eager path through the same buffers and tensors: the CPU tests check the plumbing so.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from pitsearch.errors import ConfigError

log = logging.getLogger("pitsearch.graphs")

WARMUP_STEPS = 3   # eager training steps on a side stream before the capture (torch's CUDA graphs notes: a few)
CAPTURABLE_OPTIMIZERS = ("adam", "adamw")   # torch's Adam / AdamW take capturable=True and a tensor lr
_logged: set[str] = set()


def capture_problem(train_cfg: Mapping[str, Any], aug_cfg: Mapping[str, Any] | None,
                    device: torch.device) -> str | None:
    """Why this run's steps cannot be captured as CUDA graphs, or None. `aug_cfg` None: the train keys only."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device and this run trains on {device.type}"
    if str(train_cfg.get("opt")).lower() not in CAPTURABLE_OPTIMIZERS:
        return f"only adam / adamw have a capturable step and train.opt is {train_cfg.get('opt')!r}"
    if train_cfg.get("compile"):
        return "train.compile is on (torch.compile and a hand-captured graph do not mix)"
    aug = aug_cfg or {}
    if float(aug.get("mixup") or 0) > 0 or float(aug.get("cutmix") or 0) > 0:
        return "aug.mixup / aug.cutmix draw from numpy's host RNG every batch, which a graph cannot replay"
    return None


def use_cuda_graphs(train_cfg: Mapping[str, Any], aug_cfg: Mapping[str, Any] | None, device: torch.device) -> bool:
    """`train.cuda_graph` resolved for this run: off -> False; on -> True, or ConfigError naming the problem;
    auto -> True where nothing stands in the way, else False with the reason logged (once per process)."""
    mode = train_cfg.get("cuda_graph") or "off"
    if mode == "off":
        return False
    reason = capture_problem(train_cfg, aug_cfg, device)
    if reason is None:
        return True
    if mode == "on":
        raise ConfigError("train.cuda_graph", f"is on, but {reason}; use auto (eager steps then) or off")
    if reason not in _logged:
        _logged.add(reason)
        log.warning("train.cuda_graph=auto: eager steps, because %s", reason)
    return False


class _Captured:
    """What both captured loops share: static uint8 images / labels, device sums, the warmup -> capture -> replay
    sequence."""

    warmup_runs = WARMUP_STEPS   # eager runs before the capture

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 autocast: Callable[[], Any], capture: bool):
        device = images.device
        self.static_images = torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype, device=device)
        self.static_labels = torch.empty(batch_size, dtype=labels.dtype, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.autocast = autocast   # must not cache casts inside a capture (torch: autocast cache_enabled=False)
        self.capture = capture and device.type == "cuda"
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_runs = 0
        self.capture_seconds = 0.0

    def _run(self, body: Callable[[], None]) -> None:
        """One step through the static buffers: replayed, captured (then replayed) or run eagerly."""
        if self.graph is not None:
            self.graph.replay()
            return
        self._before_run()
        if self.capture and self.eager_runs >= self.warmup_runs:
            started = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):   # records without running; the replay below runs this step
                body()
            self.graph = graph
            elapsed = time.perf_counter() - started
            self.capture_seconds += elapsed
            log.info("%s captured as a CUDA graph in %.2f s", type(self).__name__, elapsed)
            graph.replay()
            return
        if self.side_stream is None:
            body()
        else:   # warmup on a side stream, as torch's CUDA graphs notes do before a capture
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                body()
            torch.cuda.current_stream().wait_stream(self.side_stream)
        self.eager_runs += 1

    def _before_run(self) -> None:
        """Before an eager run and before the capture (never before a replay)."""


class CapturedTrainStep(_Captured):
    """`train_model`'s inner step for one batch of indices; `start_epoch` gives the zeroed device sums it adds to.

    The optimizer must be Adam / AdamW built with `capturable=True` on CUDA (any Adam / AdamW on the CPU)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, augment, train_x: torch.Tensor,
                 train_y: torch.Tensor, batch_size: int, *, label_smoothing: float, grad_clip: float,
                 autocast: Callable[[], Any], capture: bool = True):
        super().__init__(train_x, train_y, batch_size, autocast, capture)
        self.model, self.optimizer, self.augment = model, optimizer, augment
        self.train_x, self.train_y = train_x, train_y
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        # float32: the fused AdamW kernel reads a tensor lr as float
        self.lrs = [torch.zeros((), dtype=torch.float32, device=train_x.device) for _ in optimizer.param_groups]

    def start_epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.loss_sum.zero_()
        self.correct.zero_()
        return self.loss_sum, self.correct

    def __call__(self, idx: torch.Tensor, generator: torch.Generator) -> None:
        torch.index_select(self.train_y, 0, idx, out=self.static_labels)
        self.static_images.copy_(self.augment.crop_flip(self.train_x[idx], generator))
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])   # this step's lr from the scheduler; a kernel argument, no host sync
        self._run(self._step_with_tensor_lr)

    def _before_run(self) -> None:
        # Eager: fresh grads, as train_model's eager step. Capture: backward then allocates the grads inside the
        # graph's pool, and every replay writes (not adds) them there.
        self.optimizer.zero_grad(set_to_none=True)

    def _step_with_tensor_lr(self) -> None:
        floats = [group["lr"] for group in self.optimizer.param_groups]
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            group["lr"] = lr
        try:
            with warnings.catch_warnings():   # the eager warmup steps of a capturable optimizer warn, as expected
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self._step()
        finally:
            for lr, group in zip(floats, self.optimizer.param_groups):
                group["lr"] = lr

    def _step(self) -> None:
        images, labels = self.static_images, self.static_labels
        with self.autocast():
            logits = self.model(self.augment.normalize(images))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)   # foreach on CUDA; no host sync
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.detach().argmax(-1) == labels).sum()


class CapturedEval(_Captured):
    """`train.evaluate` for one split: call it for (mean cross-entropy, top-1 accuracy), read once."""

    warmup_runs = 1   # a forward has no optimizer state to create; one eager batch does the lazy setup

    def __init__(self, model: torch.nn.Module, augment, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, *, autocast: Callable[[], Any], capture: bool = True):
        super().__init__(images, labels, min(batch_size, len(labels)), autocast, capture)
        self.model, self.augment = model, augment
        self.images, self.labels = images, labels

    @torch.no_grad()
    def __call__(self) -> tuple[float, float]:
        from pitsearch.data import batch_indices

        self.model.eval()
        self.loss_sum.zero_()
        self.correct.zero_()
        batch_size = len(self.static_labels)
        for idx in batch_indices(len(self.labels), batch_size, None, self.labels.device, drop_last=False):
            if len(idx) < batch_size:   # the last partial batch: eager, outside the static shapes
                self._forward(self.images[idx], self.labels[idx])
                continue
            torch.index_select(self.images, 0, idx, out=self.static_images)
            torch.index_select(self.labels, 0, idx, out=self.static_labels)
            self._run(lambda: self._forward(self.static_images, self.static_labels))
        n = len(self.labels)
        return self.loss_sum.item() / n, self.correct.item() / n

    def _forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with self.autocast():
            logits = self.model(self.augment.eval(images))
        self.loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        self.correct += (logits.argmax(-1) == labels).sum()

