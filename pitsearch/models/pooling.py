"""Pooling layers between transformer stages, chosen by name (`model.pool`).

Every pooling module maps the spatial tokens and the class token(s) of one stage to the next:

    (x: (B, C_in, H, W), cls: (B, T, C_in))  ->  (x': (B, C_out, H', W'), cls': (B, T, C_out))

and says, without being built, how it changes the token grid (`output_grid`, `grid_stride`,
`min_input_grid`), which channel changes it supports (`channel_problem`) and what it costs
(`closed_form_macs`), so configs are validated and profiled before any weight exists.

A new type joins with one class and one registration:

    @register_pool("mytype")
    class MyPool(TokenPool):
        ...

Types, side by side (C_in -> C_out is the change from one stage's heads x head_dim to the next's):

| name   | spatial tokens                                        | class token           | grid                  |
|--------|-------------------------------------------------------|-----------------------|-----------------------|
| `conv` | depthwise 3x3 conv, stride 2, zero padding 1,         | Linear(C_in, C_out)   | H' = floor((H-1)/2)+1 |
|        | groups C_in, bias; C_out a multiple of C_in (PiT)     |                       |                       |
| `max`  | 3x3 max pool, stride 2, padding 1 (padding never      | Linear(C_in, C_out)   | H' = floor((H-1)/2)+1 |
|        | wins), then 1x1 conv C_in -> C_out with bias          |                       |                       |
| `avg`  | 3x3 average pool, stride 2, padding 1, padded cells   | Linear(C_in, C_out)   | H' = floor((H-1)/2)+1 |
|        | not counted; then 1x1 conv C_in -> C_out with bias    |                       |                       |
| `none` | no spatial reduction; 1x1 conv C_in -> C_out with     | Linear when C_in !=   | H' = H                |
|        | bias only when C_in != C_out, Identity otherwise      | C_out, else Identity  |                       |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# name -> pooling class; filled by @register_pool below (and by any module that adds a type).
POOL_TYPES: dict[str, type[TokenPool]] = {}


def register_pool(name: str) -> Callable[[type[TokenPool]], type[TokenPool]]:
    """Class decorator: make a TokenPool subclass selectable as `model.pool: <name>`."""

    def add(pool_class: type[TokenPool]) -> type[TokenPool]:
        if name in POOL_TYPES:
            raise ValueError(f"pool type {name!r} is already registered by {POOL_TYPES[name].__name__}")
        pool_class.type_name = name
        POOL_TYPES[name] = pool_class
        return pool_class

    return add


def pool_names() -> list[str]:
    return sorted(POOL_TYPES)


def get_pool_class(name: str) -> type[TokenPool]:
    """The registered class for `name`; KeyError for unknown names (validation reports those first)."""
    return POOL_TYPES[name]


class TokenPool(nn.Module):
    """Base of all pooling types: one step from stage s-1 (C_in channels) to stage s (C_out channels)."""

    type_name: str = ""
    # How many input tokens one output token steps over, per side (the token stride grows by this factor).
    grid_stride: int = 1
    # Smallest input grid side the step accepts. Stride-2 types need 3, so the next stage keeps >= 2x2 tokens:
    # a 2x2 grid would collapse to a single token and the stage after it would have nothing spatial to attend to.
    min_input_grid: int = 1

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels

    @classmethod
    def output_grid(cls, height: int, width: int) -> tuple[int, int]:
        return height, width

    @classmethod
    def channel_problem(cls, in_channels: int, out_channels: int) -> str | None:
        """Why this type cannot go from in_channels to out_channels, or None when it can."""
        return None

    @classmethod
    def closed_form_macs(cls, in_channels: int, out_channels: int, out_grid: tuple[int, int], num_cls: int) -> int:
        """Multiply-adds of one step, counted like FlopCounterMode / 2 (conv, linear; pooling ops are free)."""
        raise NotImplementedError(f"pool type {cls.type_name!r} has no closed-form MAC count")

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class _Stride2Pool(TokenPool):
    """Shared grid rule of the 3x3 / stride 2 / padding 1 types: H' = floor((H + 2 - 3) / 2) + 1."""

    grid_stride = 2
    min_input_grid = 3

    @classmethod
    def output_grid(cls, height: int, width: int) -> tuple[int, int]:
        return (height - 1) // 2 + 1, (width - 1) // 2 + 1


@register_pool("conv")
class ConvPool(_Stride2Pool):
    """PiT's pooling, exactly: a depthwise 3x3 conv, stride 2, zero padding 1, groups = C_in, with bias.

    Each input channel gets C_out / C_in filters (PiT doubles channels, so 2), hence C_out must be a multiple
    of C_in. The class token(s) go through Linear(C_in, C_out). Attribute names `conv` and `fc` match timm's
    `Pooling`, so pretrained PiT weights map key for key.
    Params: 9*C_out + C_out + C_in*C_out + C_out. MACs: 9*H'*W'*C_out + T*C_in*C_out.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, groups=in_channels)
        self.fc = nn.Linear(in_channels, out_channels)

    @classmethod
    def channel_problem(cls, in_channels: int, out_channels: int) -> str | None:
        if out_channels % in_channels:
            return (f"a depthwise conv needs output channels that are a multiple of the input's, "
                    f"got {in_channels} -> {out_channels}")
        return None

    @classmethod
    def closed_form_macs(cls, in_channels: int, out_channels: int, out_grid: tuple[int, int], num_cls: int) -> int:
        return out_grid[0] * out_grid[1] * out_channels * 9 + num_cls * in_channels * out_channels

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.fc(cls_tokens)


class _PoolThenProject(_Stride2Pool):
    """A parameter-free 3x3 / stride 2 / padding 1 pool, then a pointwise 1x1 conv C_in -> C_out (with bias).

    Pooling first keeps the projection at the reduced grid (4x fewer MACs). The 1x1 conv is there even when
    C_in == C_out, so every stride-2 type has a learned channel mix at the same place. Class token(s):
    Linear(C_in, C_out). Params: C_in*C_out + C_out (proj) + C_in*C_out + C_out (fc).
    MACs: H'*W'*C_in*C_out + T*C_in*C_out.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.pool = self._make_pool()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.fc = nn.Linear(in_channels, out_channels)

    def _make_pool(self) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def closed_form_macs(cls, in_channels: int, out_channels: int, out_grid: tuple[int, int], num_cls: int) -> int:
        return (out_grid[0] * out_grid[1] + num_cls) * in_channels * out_channels

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(self.pool(x)), self.fc(cls_tokens)


@register_pool("max")
class MaxPool(_PoolThenProject):
    """3x3 max pool, stride 2, padding 1 (implicit -inf, so padding never wins); then 1x1 conv C_in -> C_out.

    Class token(s): Linear(C_in, C_out). Same grid as `conv`: H' = floor((H-1)/2)+1.
    """

    def _make_pool(self) -> nn.Module:
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


@register_pool("avg")
class AvgPool(_PoolThenProject):
    """3x3 average pool, stride 2, padding 1 with count_include_pad=False (border cells average only real
    tokens, so edges are not darkened); then 1x1 conv C_in -> C_out. Class token(s): Linear(C_in, C_out).
    Same grid as `conv`: H' = floor((H-1)/2)+1.
    """

    def _make_pool(self) -> nn.Module:
        return nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False)


@register_pool("none")
class NoPool(TokenPool):
    """No spatial reduction (H' = H). Channels change only through a pointwise projection when they differ:
    1x1 conv C_in -> C_out (bias) on the spatial tokens and Linear(C_in, C_out) on the class token(s); both are
    Identity when C_in == C_out, which makes a multi-stage `none` model a plain ViT split into stages.
    MACs: (H*W + T)*C_in*C_out when channels differ, else 0.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        same = in_channels == out_channels
        self.proj = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.fc = nn.Identity() if same else nn.Linear(in_channels, out_channels)

    @classmethod
    def closed_form_macs(cls, in_channels: int, out_channels: int, out_grid: tuple[int, int], num_cls: int) -> int:
        if in_channels == out_channels:
            return 0
        return (out_grid[0] * out_grid[1] + num_cls) * in_channels * out_channels

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), self.fc(cls_tokens)


def build_pool(name: str, in_channels: int, out_channels: int) -> TokenPool:
    return get_pool_class(name)(in_channels, out_channels)
