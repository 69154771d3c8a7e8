"""Spatial interaction of attention, per block: how far and how widely each spatial token looks (PiT §3.3).

Three statistics of the post-softmax attention map A (B, heads, N, N) of one block, each averaged over images,
heads and spatial query rows. The first `num_prefix_tokens` rows/columns (the class token) are left out of all
three, so PiT and ViT compare on their image tokens only:

- `interaction_ratio`: share of spatial-query x spatial-key entries of the *raw* map above a threshold
  (the paper's "spatial interaction over 10%"); no renormalisation, so attention sent to the class token
  simply lowers the spatial entries;
- `distance_px`: attention-weighted Euclidean distance from a query to its keys, in input pixels (grid
  coordinates x the stage's token stride, so a pooled stage and a ViT grid compare), with each query's
  weights renormalised over spatial keys. The paper uses an L1 distance on (x/W, y/H) instead;
  pixels keep stages at different resolutions on one scale;
- `entropy`: -sum p log p (nats) of each query's weights renormalised over spatial keys.

A query that sends all of its attention to the class token has no spatial weights: it counts as distance 0 and
entropy 0. Every block is measured, including the last, whose spatial outputs never reach the head (the paper
skips it); the plot shows it, the reader may ignore it.

Maps are captured only when asked: `capture_attention` switches each timm `Attention` to its math path and hooks
the input of `attn_drop` (the post-softmax map), then restores the flag and removes the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

METRICS = ("interaction_ratio", "distance_px", "entropy")
_PANELS = {"interaction_ratio": "interaction ratio (share > threshold)", "distance_px": "mean distance (px)",
           "entropy": "entropy (nats)"}


# --- pure statistics of one attention map --------------------------------------------------------------------

def _spatial(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention (B, heads, N, N), got shape {tuple(attn.shape)}")
    return attn[..., num_prefix_tokens:, num_prefix_tokens:].double()


def _renormalised(spatial: torch.Tensor) -> torch.Tensor:
    # tiny floor: a row with no spatial weight stays all zeros instead of becoming NaN
    return spatial / spatial.sum(-1, keepdim=True).clamp_min(1e-30)


def token_positions_px(grid: Sequence[int], token_stride: float) -> torch.Tensor:
    """(H*W, 2) pixel positions (row, col) x stride, in the row-major order tokens are flattened in."""
    height, width = grid
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack((rows, cols), -1).reshape(-1, 2).double() * token_stride


def interaction_ratio(attn: torch.Tensor, num_prefix_tokens: int = 1, threshold: float = 0.1) -> float:
    """Share of raw post-softmax entries (spatial query x spatial key) strictly above `threshold`."""
    return (_spatial(attn, num_prefix_tokens) > threshold).double().mean().item()


def attention_distance_px(attn: torch.Tensor, grid: Sequence[int], token_stride: float,
                          num_prefix_tokens: int = 1) -> float:
    """Mean over spatial queries of sum_k w_qk * ||p_q - p_k||_2 (pixels), w renormalised over spatial keys."""
    spatial = _spatial(attn, num_prefix_tokens)
    positions = token_positions_px(grid, token_stride).to(spatial.device)
    if positions.shape[0] != spatial.shape[-1]:
        raise ValueError(f"grid {tuple(grid)} has {positions.shape[0]} tokens but the map has "
                         f"{spatial.shape[-1]} spatial tokens (num_prefix_tokens={num_prefix_tokens})")
    distances = torch.cdist(positions, positions)
    return (_renormalised(spatial) * distances).sum(-1).mean().item()


def attention_entropy(attn: torch.Tensor, num_prefix_tokens: int = 1) -> float:
    """Mean over spatial queries of -sum_k w_qk log w_qk (nats), w renormalised over spatial keys; 0 log 0 = 0."""
    weights = _renormalised(_spatial(attn, num_prefix_tokens))
    return (-torch.special.xlogy(weights, weights).sum(-1)).mean().item()


def block_statistics(attn: torch.Tensor, grid: Sequence[int], token_stride: float, num_prefix_tokens: int = 1,
                     threshold: float = 0.1) -> dict[str, float]:
    """All three statistics of one block's map, keyed as in METRICS."""
    return {"interaction_ratio": interaction_ratio(attn, num_prefix_tokens, threshold),
            "distance_px": attention_distance_px(attn, grid, token_stride, num_prefix_tokens),
            "entropy": attention_entropy(attn, num_prefix_tokens)}


# --- capturing the maps from a model -------------------------------------------------------------------------

def block_layout(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One entry per transformer block, in forward order: its stage, grid (H, W), token stride and Attention."""
    layout = []
    for s, stage in enumerate(model.stages):
        for block in stage.blocks:
            layout.append({"stage": s, "grid": tuple(model.grid_sizes[s]), "token_stride": model.token_strides[s],
                           "attn": block.attn})
    return layout


@contextlib.contextmanager
def capture_attention(model: torch.nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Inside the `with` statement, each forward fills `maps[i]` with block i's post-softmax attention.

    Maps are (B, heads, N, N), N including the class token. timm's fused SDPA never materialises the map, so
    each Attention runs its math path here (same maths; outputs can differ from the fused kernel in the last
    float bits). The map is read at the input of `attn_drop`, i.e. before attention dropout. Flags and hooks
    are restored on exit, even after an error, so training outside the `with` keeps the fused kernel.
    """
    modules = [entry["attn"] for entry in block_layout(model)]
    for module in modules:
        if not hasattr(module, "fused_attn") or not isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
            raise TypeError(f"{type(module).__name__} is not a timm Attention (needs fused_attn and attn_drop)")
    maps: list[torch.Tensor | None] = [None] * len(modules)
    saved_flags = [module.fused_attn for module in modules]
    handles = []

    def hook_for(index: int):
        def store(_module, inputs, _output):
            maps[index] = inputs[0].detach()
        return store

    try:
        for index, module in enumerate(modules):
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(hook_for(index)))
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in zip(modules, saved_flags):
            module.fused_attn = flag


def stage_boundaries(stage_of_block: Sequence[int]) -> list[int]:
    """Index of the first block of every stage after the first (a pooling layer sits just before it)."""
    return [i for i in range(1, len(stage_of_block)) if stage_of_block[i] != stage_of_block[i - 1]]


@torch.no_grad()
def spatial_profile(model: torch.nn.Module, images: torch.Tensor, threshold: float = 0.1,
                    batch_size: int = 16) -> dict[str, Any]:
    """Per-block statistics of `model` on normalised `images` (B, C, H, W), averaged over images and heads.

    Images go through in chunks of `batch_size` and only running sums are kept, so memory stays at one
    chunk's maps even for 224 px models. Returns lists indexed by block: `interaction_ratio`, `distance_px`,
    `entropy`, `stage_of_block`; plus `stage_boundaries` (see `stage_boundaries`), `threshold`, `images`.
    The model's train/eval mode is restored afterwards.
    """
    layout = block_layout(model)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    sums = {key: [0.0] * len(layout) for key in METRICS}
    was_training = model.training
    model.eval()  # no dropout or drop-path in the measured maps
    try:
        with capture_attention(model) as maps:
            for chunk in images.split(batch_size):
                model(chunk)
                for i, entry in enumerate(layout):
                    stats = block_statistics(maps[i], entry["grid"], entry["token_stride"], prefix, threshold)
                    for key in METRICS:  # chunk means weighted by chunk size: an exact mean over images
                        sums[key][i] += stats[key] * len(chunk)
    finally:
        model.train(was_training)
    stage_of_block = [entry["stage"] for entry in layout]
    profile: dict[str, Any] = {key: [value / len(images) for value in sums[key]] for key in METRICS}
    profile.update(stage_of_block=stage_of_block, stage_boundaries=stage_boundaries(stage_of_block),
                   threshold=threshold, images=len(images))
    return profile


def summary_metrics(profile: Mapping[str, Any]) -> dict[str, float]:
    """Means over blocks: `spatial/mean_interaction_ratio`, `spatial/mean_distance_px`, `spatial/mean_entropy`."""
    return {f"spatial/mean_{key}": sum(profile[key]) / len(profile[key]) for key in METRICS if profile[key]}


# --- the plot across depth --------------------------------------------------------------------------------------

def spatial_figure(variants: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]], title: str | None = None):
    """One panel per statistic against block index; one line per variant, stage boundaries as dashed lines.

    `variants`: label -> one profile (as `spatial_profile` returns, or its JSON) or a list of them (seeds of one
    variant: drawn as the mean with a 95% band). Variants of different depth overlay on the same block axis.
    """
    import numpy as np

    from pitsearch.plots import pyplot
    from pitsearch.stats import mean_ci_curves

    plt = pyplot()
    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    colours = plt.get_cmap("tab10")
    for index, (label, runs) in enumerate(variants.items()):
        runs = [runs] if isinstance(runs, Mapping) else list(runs)
        colour = colours(index % 10)
        depth = min(len(run["distance_px"]) for run in runs)
        blocks = np.arange(depth)
        legend = f"{label} (n={len(runs)})" if len(runs) > 1 else label
        for ax, key in zip(axes, METRICS):
            mean, half_width = mean_ci_curves(np.array([run[key][:depth] for run in runs], dtype=float))
            ax.plot(blocks, mean, color=colour, marker="o", ms=4, label=legend)
            if len(runs) > 1:
                ax.fill_between(blocks, mean - half_width, mean + half_width, color=colour, alpha=0.2, linewidth=0)
            for boundary in runs[0].get("stage_boundaries", []):  # pooling sits between block b-1 and b
                ax.axvline(boundary - 0.5, color=colour, linestyle="--", linewidth=1, alpha=0.7)
    for ax, key in zip(axes, METRICS):
        ax.set_title(_PANELS[key])
        ax.set_xlabel("block")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title or "spatial interaction by depth (dashed: pooling / stage boundary)")
    figure.tight_layout()
    return figure

