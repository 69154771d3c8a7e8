"""The paper's three curves (capability, generalization, performance) for one run or for variants over seeds,
and accuracy against cost with the Pareto front.

A variant with several seeds is drawn as its mean with a 95% confidence band (t interval over seeds, from
pitsearch.stats). Pass the same `colours` to every figure of a report so a variant keeps its colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pitsearch import stats

PANELS = (
    ("capability", "epoch", "train/loss", "train loss"),
    ("generalization", "train/acc", "val/acc", "val acc"),
    ("performance", "epoch", "val/acc", "val acc"),
)
History = Mapping[str, Sequence[float]]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def variant_colours(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per label, in order (tab10, then tab20 for more than ten variants)."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _stack(histories: Sequence[History], key: str) -> np.ndarray:
    """Seeds x epochs, cut to the shortest run so pruned runs do not break the band."""
    series = [np.asarray(h.get(key, []), dtype=float) for h in histories]
    length = min((len(s) for s in series), default=0)
    return np.stack([s[:length] for s in series]) if length else np.zeros((len(series), 0))


def run_curves_figure(variants: Mapping[str, Sequence[History] | History], title: str | None = None,
                      colours: Mapping[str, tuple] | None = None):
    """`variants`: label -> one history ({metric: per-epoch values}) or a list of histories (one per seed)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = colours or variant_colours(list(variants))
    for label, runs in variants.items():
        runs = [runs] if isinstance(runs, Mapping) else list(runs)
        colour = colours[label]
        for ax, (name, x_key, y_key, y_label) in zip(axes, PANELS):
            y_mean, y_ci = stats.mean_ci_curves(_stack(runs, y_key))
            if x_key == "epoch":
                x_mean = np.arange(1, len(y_mean) + 1)
            else:
                x_mean, _ = stats.mean_ci_curves(_stack(runs, x_key))
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


def accuracy_cost_figure(points: Mapping[str, tuple[float, Sequence[float]]], cost_label: str = "MACs",
                         score_label: str = "val/acc_best", title: str | None = None,
                         colours: Mapping[str, tuple] | None = None):
    """`points`: label -> (cost, per-seed scores). Each variant is its mean score with a 95% CI bar over
    seeds (the seeds as faint dots); the dashed line joins the Pareto front of the means (lower cost,
    higher score)."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 4.8))
    colours = colours or variant_colours(list(points))
    labels, costs, means = [], [], []
    for label, (cost, scores) in points.items():
        interval = stats.mean_ci(scores)
        if cost is None or interval.n == 0:
            continue
        colour = colours[label]
        ax.scatter([cost] * len(scores), scores, color=colour, alpha=0.35, s=14, linewidths=0)
        error = None if np.isnan(interval.half_width) else interval.half_width
        ax.errorbar([cost], [interval.mean], yerr=error, fmt="o", color=colour, capsize=4, ms=6,
                    label=f"{label} (n={interval.n})")
        labels.append(label)
        costs.append(float(cost))
        means.append(interval.mean)
    front = stats.pareto_indices(costs, means)
    if front:
        ax.step([costs[i] for i in front], [means[i] for i in front], where="post", color="black",
                linestyle="--", linewidth=1, label="Pareto front (means)", zorder=0)
    if costs and max(costs) / max(min(costs), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(cost_label)
    ax.set_ylabel(f"{score_label} (mean ± 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{score_label} vs {cost_label}")
    figure.tight_layout()
    return figure
