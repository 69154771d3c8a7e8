"""One configurable hierarchical vision transformer that covers PiT and ViT (Heo et al. 2021).

Data flow, top to bottom: conv stem -> + position embedding (NCHW) -> class token -> stages (each: pooling,
then timm transformer blocks on [cls; spatial tokens]) -> LayerNorm on the class token -> Linear head.

A one-stage model is a plain ViT/DeiT (patch = stride = 16, `cls_pos_embed` for DeiT's class position);
PiT is three stages joined by `conv` pooling. Module names follow timm's PiT (`patch_embed.conv`, `pos_embed`,
`cls_token`, `stages.{s}.pool.{conv,fc}`, `stages.{s}.blocks.{j}`, `norm`, `head`), so its weights map key for
key (`transformers.` -> `stages.`); see timm_import.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from pitsearch.models.pooling import TokenPool, build_pool, get_pool_class

NUM_CLS_TOKENS = 1  # PiT's distilled variants use 2; pitsearch builds only the plain class-token models.


def stem_grid(img_size: int, patch_size: int, stride: int) -> int:
    """Grid side of the unpadded conv stem: floor((img - patch) / stride) + 1 (27 for PiT at 224, 16/8)."""
    return (img_size - patch_size) // stride + 1


def stage_layout(img_size: int, patch_size: int, stride: int, pool: str, num_stages: int) -> list[dict]:
    """Grid (H, W) and token stride (input pixels per token step) of each stage, computed without building.

    Shared by the model, validation and the closed-form cost so the three cannot disagree.
    """
    pool_class = get_pool_class(pool)
    side = stem_grid(img_size, patch_size, stride)
    grid, token_stride = (side, side), stride
    layout = [{"grid": grid, "token_stride": token_stride}]
    for _ in range(1, num_stages):
        grid = pool_class.output_grid(*grid)
        token_stride *= pool_class.grid_stride
        layout.append({"grid": grid, "token_stride": token_stride})
    return layout


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """timm's rule: linear from 0 to `rate` over all blocks (the last block gets exactly `rate`), split by stage."""
    total = sum(depths)
    # Plain Python rather than torch.linspace, so the model also builds under `with torch.device("meta")`.
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    per_stage, start = [], 0
    for depth in depths:
        per_stage.append(flat[start:start + depth])
        start += depth
    return per_stage


class ConvStem(nn.Module):
    """Overlapping patch embedding: Conv2d(in_chans -> C0, kernel patch_size, stride, padding 0, bias)."""

    def __init__(self, in_chans: int, out_channels: int, patch_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_channels, kernel_size=patch_size, stride=stride, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Stage(nn.Module):
    """Optional pooling (None for stage 0), then `depth` pre-norm timm Blocks over [class tokens; H*W tokens]."""

    def __init__(self, pool: TokenPool | None, dim: int, depth: int, heads: int, mlp_ratio: float,
                 drop_path: Sequence[float]):
        super().__init__()
        self.pool = pool
        self.blocks = nn.Sequential(*[
            Block(dim=dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path[i],
                  act_layer=nn.GELU, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is not None:
            x, cls_tokens = self.pool(x, cls_tokens)
        batch, channels, height, width = x.shape
        num_cls = cls_tokens.shape[1]
        tokens = torch.cat((cls_tokens, x.flatten(2).transpose(1, 2)), dim=1)
        tokens = self.blocks(tokens)
        cls_tokens = tokens[:, :num_cls]
        x = tokens[:, num_cls:].transpose(1, 2).reshape(batch, channels, height, width)
        return x, cls_tokens


class PoolingViT(nn.Module):
    """Hierarchical ViT: conv stem, stages of timm Blocks joined by a registered pooling type, class-token head.

    Build it through `pitsearch.models.build_model`, which validates the config first; the arguments here are
    the config keys of conf/model/*.yaml (lists have one entry per stage; channels = heads x head_dims).
    """

    num_prefix_tokens = NUM_CLS_TOKENS

    # No defaults here: build_model passes every key, resolved against ModelConfig (pitsearch.config.schema), the
    # one place they are written.
    def __init__(self, depths: Sequence[int], heads: Sequence[int], head_dims: Sequence[int], patch_size: int,
                 stride: int, pool: str, mlp_ratio: float, drop_path: float, drop_rate: float, cls_pos_embed: bool,
                 img_size: int, in_chans: int, num_classes: int):
        super().__init__()
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.pool_type = pool
        self.depths, self.heads, self.head_dims = list(depths), list(heads), list(head_dims)
        self.channels = [h * d for h, d in zip(heads, head_dims)]
        layout = stage_layout(img_size, patch_size, stride, pool, len(depths))
        self.grid_sizes = [stage["grid"] for stage in layout]
        self.token_strides = [stage["token_stride"] for stage in layout]

        width0 = self.channels[0]
        self.patch_embed = ConvStem(in_chans, width0, patch_size, stride)
        # NCHW position embedding added to the conv map before flattening (PiT); the class token gets its own
        # position only when asked (DeiT/ViT weights carry one).
        self.pos_embed = nn.Parameter(torch.zeros(1, width0, *self.grid_sizes[0]))
        self.cls_token = nn.Parameter(torch.zeros(1, NUM_CLS_TOKENS, width0))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, NUM_CLS_TOKENS, width0)) if cls_pos_embed else None

        rates = drop_path_rates(drop_path, depths)
        stages = []
        for s, (depth, num_heads) in enumerate(zip(depths, heads)):
            pool_module = build_pool(pool, self.channels[s - 1], self.channels[s]) if s > 0 else None
            stages.append(Stage(pool_module, self.channels[s], depth, num_heads, mlp_ratio, rates[s]))
        self.stages = nn.ModuleList(stages)

        self.num_features = self.channels[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # PiT's init: truncated normal for the learned embeddings, LayerNorm reset; Linear/Conv (head included)
        # keep PyTorch's defaults, unlike timm's ViT.
        for param in (self.pos_embed, self.cls_token, self.cls_pos_embed):
            if param is not None:
                trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        if self.cls_pos_embed is not None:
            names.add("cls_pos_embed")
        return names

    def stage_summaries(self) -> list[dict]:
        """Per-stage shape facts (for profiles and logs): grid, tokens incl. class token, channels, depth, heads."""
        summaries = []
        for s, stage in enumerate(self.stages):
            height, width = self.grid_sizes[s]
            summaries.append({
                "stage": s,
                "pool": None if stage.pool is None else self.pool_type,
                "grid": f"{height}x{width}",
                "tokens": height * width + NUM_CLS_TOKENS,
                "channels": self.channels[s],
                "depth": self.depths[s],
                "heads": self.heads[s],
                "head_dim": self.head_dims[s],
                "token_stride": self.token_strides[s],
            })
        return summaries

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> normalised class token(s) (B, 1, C_last), as timm's PiT returns them."""
        x = self.patch_embed(x) + self.pos_embed
        cls_tokens = self.cls_token if self.cls_pos_embed is None else self.cls_token + self.cls_pos_embed
        cls_tokens = cls_tokens.expand(x.shape[0], -1, -1)
        for stage in self.stages:
            x, cls_tokens = stage(x, cls_tokens)
        # The last stage's spatial tokens are dropped: only the class token reaches the head.
        return self.norm(cls_tokens)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        cls_features = self.head_drop(features[:, 0])
        return cls_features if pre_logits else self.head(cls_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
