"""The paper's three curves (capability, generalization, performance) for one run or for variants over seeds.

A variant with several seeds is drawn as its mean with a 95% confidence band (t interval over seeds).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

PANELS = (
    ("capability", "epoch", "train/loss", "train loss"),
    ("generalization", "train/acc", "val/acc", "val acc"),
    ("performance", "epoch", "val/acc", "val acc"),
)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the t confidence interval along axis 0 (seeds); half-width 0 for one seed."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=0)
    n = values.shape[0]
    if n < 2:
        return mean, np.zeros_like(mean)
    sem = values.std(axis=0, ddof=1) / np.sqrt(n)
    return mean, sem * stats.t.ppf(0.5 + confidence / 2, n - 1)


def _stack(histories: Sequence[Mapping[str, Sequence[float]]], key: str) -> np.ndarray:
    """Seeds x epochs, cut to the shortest run so pruned runs do not break the band."""
    series = [np.asarray(h.get(key, []), dtype=float) for h in histories]
    length = min((len(s) for s in series), default=0)
    return np.stack([s[:length] for s in series]) if length else np.zeros((len(series), 0))


def run_curves_figure(variants: Mapping[str, Sequence[Mapping[str, Sequence[float]]] | Mapping[str, Sequence[float]]],
                      title: str | None = None):
    """`variants`: label -> one history ({metric: per-epoch values}) or a list of histories (one per seed)."""
    plt = _matplotlib()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.get_cmap("tab10")
    for index, (label, runs) in enumerate(variants.items()):
        runs = [runs] if isinstance(runs, Mapping) else list(runs)
        colour = colours(index % 10)
        for ax, (name, x_key, y_key, y_label) in zip(axes, PANELS):
            y_mean, y_ci = mean_ci(_stack(runs, y_key))
            if x_key == "epoch":
                x_mean = np.arange(1, len(y_mean) + 1)
            else:
                x_mean, _ = mean_ci(_stack(runs, x_key))
                x_mean = x_mean[: len(y_mean)]
            n_seeds = len(runs)
            legend = f"{label} (n={n_seeds})" if n_seeds > 1 else label
            ax.plot(x_mean, y_mean, color=colour, label=legend, marker="o" if len(y_mean) < 15 else None, ms=3)
            if n_seeds > 1:
                ax.fill_between(x_mean, y_mean - y_ci, y_mean + y_ci, color=colour, alpha=0.2, linewidth=0)
            ax.set_title(name)
            ax.set_xlabel("train acc" if x_key == "train/acc" else "epoch")
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    low = min(axes[1].get_xlim()[0], axes[1].get_ylim()[0])
    high = max(axes[1].get_xlim()[1], axes[1].get_ylim()[1])
    axes[1].plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1, label="val = train")
    for ax in axes:
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
