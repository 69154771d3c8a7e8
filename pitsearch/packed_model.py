"""K models of one architecture as one stacked model: a member dimension in front of every weight.

The members' parameters live in one flat (K, P) leaf tensor; each step hands `torch.func.functional_call` views
of it, `torch.func.vmap` maps the model over the member dimension, and one backward fills one (K, P) gradient.
AdamW, weight decay and gradient clipping then run per member as a few whole-tensor ops with (K, 1) factors.

Two things vmap cannot do alone:
- Attention. torch (2.14) has no vmap batching rule for its CPU flash SDPA kernel: vmap warns ("performance
  drop") and loops over members (pit_nano, 28 px, K=3, 1 thread: 474 img/s vs 507 folded); `_FoldedSDPA` folds
  the member dimension into the batch dimension, calls the fused kernel once on (K*B, heads, N, d) and unfolds
  (on every device: one kernel call, whatever batching rules a device has). A torch-function mode routes every
  `F.scaled_dot_product_attention` call made under the packed forward (timm's `Attention`) through it, so the
  model code stays as it is.
- Per-member randomness. Under vmap a random op would draw one stream for the whole stack. Dropout and drop path
  modules with p > 0 run instead once per member on its own slice, drawing from that member's generator swapped
  in as the default one: the same draws, in the same order, as `train_model`'s `torch.manual_seed(seed)` run.
  Any other random op raises (vmap's randomness="error").
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode


def _fold(tensor: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """(..., K at `dim`, ...) -> (K * B, ...): the member dimension merged into the batch dimension."""
    tensor = tensor.movedim(dim, 0) if dim is not None else tensor.expand(size, *tensor.shape)
    return tensor.reshape(size * tensor.shape[1], *tensor.shape[2:])


class _VmapOnly(torch.autograd.Function):
    """A Function of which only the `vmap` rule ever runs: the rule calls ordinary ops on plain tensors, which
    autograd records as usual, so the backward is theirs; the Function's own backward is never reached."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("only differentiated under vmap")


class _FoldedSDPA(_VmapOnly):
    """F.scaled_dot_product_attention whose vmap rule folds members into the batch (one fused kernel call)."""

    @staticmethod
    def forward(q, k, v, kwargs):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    @staticmethod
    def vmap(info, in_dims, q, k, v, kwargs):
        if kwargs.get("dropout_p") or kwargs.get("attn_mask") is not None:
            raise NotImplementedError("packed training supports attention without dropout or mask")
        size = info.batch_size
        out = F.scaled_dot_product_attention(*(_fold(t, d, size) for t, d in zip((q, k, v), in_dims[:3])),
                                             **kwargs)
        return out.view(size, -1, *out.shape[1:]), 0


class _FoldAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            return _FoldedSDPA.apply(q, k, v, {**dict(zip(names, rest)), **kwargs})
        return func(*args, **kwargs)


class MemberRNG:
    """One generator per member, seeded like `train_model` seeds the global RNG, swapped in as the default one
    while a member's random op runs (so timm's and torch's own dropout code draws from it)."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def keep(self, members: Sequence[int]) -> None:
        self.generators = [self.generators[m] for m in members]

    @contextlib.contextmanager
    def member(self, index: int):
        default = (torch.cuda.default_generators[self.device.index or torch.cuda.current_device()]
                   if self.device.type == "cuda" else torch.default_generator)
        saved = default.get_state()
        default.set_state(self.generators[index].get_state())
        try:
            yield
        finally:
            self.generators[index].set_state(default.get_state())
            default.set_state(saved)


class _PerMember(_VmapOnly):
    """Under vmap: run `module` once per member on its own slice with its own RNG, then restack."""

    @staticmethod
    def forward(x, module, rng):
        return module(x)

    @staticmethod
    def vmap(info, in_dims, x, module, rng):
        x = x.movedim(in_dims[0], 0)
        outputs = []
        for index in range(info.batch_size):
            with rng.member(index):
                outputs.append(module(x[index].contiguous()))  # draws follow memory order
        return torch.stack(outputs), 0


class _MemberRandom(nn.Module):
    """Stands in for a Dropout / DropPath with p > 0 inside the packed template."""

    def __init__(self, inner: nn.Module, rng: MemberRNG):
        super().__init__()
        self._inner = (inner,)  # a tuple: not a submodule, so parameter names stay the model's
        self._rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self._inner[0]
        inner.train(self.training)
        if not self.training:
            return inner(x)
        return _PerMember.apply(x, inner, self._rng)


def _is_random(module: nn.Module) -> bool:
    from timm.layers import DropPath

    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return isinstance(module, DropPath) and module.drop_prob > 0


class PackedModel:
    """K same-architecture models as one: `flat` (K, P) parameters, a meta-device template, per-member RNG.

    `members` maps the current rows to the indices of the models passed in; `keep` drops rows.
    """

    def __init__(self, models: Sequence[nn.Module], seeds: Sequence[int]):
        device = next(models[0].parameters()).device
        self.models = list(models)
        self.members = list(range(len(models)))
        named = list(models[0].named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [param.shape for _, param in named]
        self.numels = [param.numel() for _, param in named]
        for model in models[1:]:
            if [(n, p.shape) for n, p in model.named_parameters()] != list(zip(self.names, self.shapes)):
                raise ValueError("packed members must share one architecture (parameter names and shapes)")
        self.flat = torch.stack([nn.utils.parameters_to_vector(m.parameters()).detach() for m in models])
        self.flat.requires_grad_(True)
        self.buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in models])
                        for name, _ in models[0].named_buffers()}
        self.rng = MemberRNG(seeds, device)
        self.template = copy.deepcopy(models[0]).to("meta")
        for parent in list(self.template.modules()):
            for child_name, child in list(parent.named_children()):
                if _is_random(child):
                    setattr(parent, child_name, _MemberRandom(child, self.rng))

    @property
    def size(self) -> int:
        return self.flat.shape[0]

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def params(self) -> dict[str, torch.Tensor]:
        """Views of `flat` shaped (K, *param shape); autograd sums their gradients into flat.grad in one cat."""
        chunks = self.flat.split(self.numels, dim=1)
        return {name: chunk.view(self.size, *shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """(K, B, ...) member inputs, or one (B, ...) input for every member -> (K, B, classes) logits."""

        def member_forward(params, buffers, images):
            return functional_call(self.template, (params, buffers), (images,))

        with _FoldAttention():
            return vmap(member_forward, in_dims=(0, 0, None if shared_input else 0),
                        randomness="error")(self.params(), self.buffers, x)

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not in `rows` (positions in the current stack), e.g. a pruned or diverged member."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.flat.device)
        self.flat = self.flat.detach()[index].requires_grad_(True)
        self.buffers = {name: value[index] for name, value in self.buffers.items()}
        self.rng.keep(rows)
        self.members = [self.members[row] for row in rows]

    @torch.no_grad()
    def write_back(self, row: int) -> None:
        """Copy row `row`'s weights into its own nn.Module (for analyses and checkpoints after training), left
        in eval mode as train_model leaves its model (evaluation runs last in every epoch)."""
        model = self.models[self.members[row]].eval()
        nn.utils.vector_to_parameters(self.flat[row].detach(), model.parameters())
        for name, buffer in model.named_buffers():
            buffer.copy_(self.buffers[name][row])


class PackedAdamW:
    """AdamW over the (K, P) stack with per-member lr and weight decay: torch.optim.AdamW's single-tensor
    update, term for term, with (K, 1) factors. Which parameters decay comes from timm's own param groups
    (`create_optimizer_v2`), so it matches the unpacked run; betas and eps are read from the optimizer it builds.
    """

    def __init__(self, packed: PackedModel, train_cfg: Any, weight_decays: Sequence[float]):
        from timm.optim import create_optimizer_v2

        reference = create_optimizer_v2(packed.models[0], opt=train_cfg["opt"], lr=train_cfg["lr"],
                                        weight_decay=1.0)  # any wd > 0: only which parameters decay matters
        if type(reference) is not torch.optim.AdamW:
            raise ValueError(f"packed training implements AdamW only; train.opt={train_cfg['opt']!r} "
                             f"gives {type(reference).__name__}")
        group = reference.param_groups[0]
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("packed AdamW supports neither amsgrad nor maximize")
        self.beta1, self.beta2 = group["betas"]
        self.eps = group["eps"]
        decays = {id(p) for g in reference.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        model_params = list(packed.models[0].parameters())
        self.decay_mask = torch.cat([torch.full((p.numel(),), id(p) in decays, dtype=torch.bool)
                                     for p in model_params]).to(packed.flat.device)
        self.weight_decays = list(weight_decays)
        self.exp_avg = torch.zeros_like(packed.flat, memory_format=torch.contiguous_format).detach()
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step_count = 0

    def keep(self, rows: Sequence[int]) -> None:
        self.exp_avg, self.exp_avg_sq = self.exp_avg[list(rows)], self.exp_avg_sq[list(rows)]
        self.weight_decays = [self.weight_decays[row] for row in rows]

    @torch.no_grad()
    def step(self, flat: torch.Tensor, lrs: Sequence[float]) -> None:
        grad = flat.grad
        device = flat.device
        self.step_count += 1
        # 1 - lr * wd and lr / bias_correction1 in Python floats, as the unpacked optimizer computes them.
        decay = torch.tensor([[1 - lr * wd] for lr, wd in zip(lrs, self.weight_decays)], device=device)
        flat.mul_(torch.where(self.decay_mask, decay, 1.0))
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1 ** self.step_count
        bias_correction2 = 1 - self.beta2 ** self.step_count
        neg_step_size = torch.tensor([[-lr / bias_correction1] for lr in lrs], device=device)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
        flat.add_(neg_step_size * self.exp_avg / denom)  # addcdiv's order: (value * t1) / t2


@torch.no_grad()
def clip_grad_norm_per_member(flat: torch.Tensor, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for each row of flat.grad by its own global 2-norm; returns the (K,) norms."""
    norms = torch.linalg.vector_norm(flat.grad, dim=1)
    flat.grad.mul_(torch.clamp(max_norm / (norms + 1e-6), max=1.0).unsqueeze(1))
    return norms
