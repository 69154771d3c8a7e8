"""The report's PNGs: pitsearch's own curves and accuracy-vs-MACs (one colour per variant, mean with a 95% CI
band over seeds), and Optuna's plots where they apply. A plot that cannot be drawn is skipped with a note,
never failing the report."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pitsearch.report.tables import PRIMARY_METRIC

DPI = 110


def write_figures(out_dir: Path, study, spec, variants: list[dict[str, Any]]) -> tuple[list[Path], list[str]]:
    """All figures into `out_dir`; returns (written files, notes about skipped plots)."""
    from pitsearch.plots import run_curves_figure, variant_colours

    written: list[Path] = []
    notes: list[str] = []
    colours = variant_colours([row["variant"] for row in variants])
    if variants:
        curves = {row["variant"]: [r["history"] for r in row["records"] if r["history"]] for row in variants}
        curves = {label: runs for label, runs in curves.items() if runs}
        _save(out_dir / "curves.png", lambda: run_curves_figure(
            curves, title=f"{spec.study_name}: capability, generalization, performance (mean ± 95% CI over seeds)",
            colours=colours), written, notes, "curves" if curves else None)
        points = {row["variant"]: (row["macs"], [r["final"].get(PRIMARY_METRIC) for r in row["records"]])
                  for row in variants}
        _save(out_dir / "acc_vs_macs.png", lambda: accuracy_macs_figure(
            points, title=f"{spec.study_name}: {PRIMARY_METRIC} vs MACs (Pareto front of the variant means)",
            colours=colours),
            written, notes, "accuracy vs MACs" if any(p[0] is not None for p in points.values()) else None)
        # Trials that ran with eval.spatial carry per-block attention profiles: overlay the variants (PiT vs ViT).
        profiles = {row["variant"]: [r["spatial"] for r in row["records"] if r.get("spatial")] for row in variants}
        profiles = {label: runs for label, runs in profiles.items() if runs}
        if profiles:
            from pitsearch.analysis.spatial import spatial_figure

            _save(out_dir / "spatial.png", lambda: spatial_figure(
                profiles, title=f"{spec.study_name}: spatial interaction by block (mean ± 95% CI over seeds)"),
                written, notes, "spatial interaction")
    else:
        notes.append("no completed trial: no curves, no accuracy-vs-MACs plot")
    import matplotlib

    with matplotlib.rc_context():   # Optuna's plots switch the global style to ggplot; keep that in here
        _optuna_figures(out_dir, study, spec, written, notes)
    return written, notes


MAC_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def mac_unit(costs) -> tuple[float, str]:
    """(scale, prefix) that puts the largest cost between 1 and 1000: 13.9 M rather than 1.39e7."""
    top = max((abs(float(c)) for c in costs if c is not None), default=0.0)
    return next(((scale, prefix) for scale, prefix in MAC_UNITS if top >= scale), (1.0, ""))


def accuracy_macs_figure(points: dict[str, tuple[Any, list]], title: str, colours=None):
    """pitsearch.plots.accuracy_cost_figure with MACs in K / M / G units: "MACs (M)" and ticks 5, 10, 15,
    instead of matplotlib's raw counts with a "1e7" offset that a reader has to fold back in."""
    from pitsearch.plots import accuracy_cost_figure

    scale, prefix = mac_unit(cost for cost, _ in points.values())
    scaled = {label: (None if cost is None else float(cost) / scale, scores)
              for label, (cost, scores) in points.items()}
    figure = accuracy_cost_figure(scaled, cost_label=f"MACs ({prefix})" if prefix else "MACs",
                                  score_label=PRIMARY_METRIC, title=title, colours=colours)
    ax = figure.axes[0]
    if ax.get_xscale() == "linear":   # a log axis has no offset to turn off
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    return figure


def _optuna_figures(out_dir: Path, study, spec, written: list[Path], notes: list[str]) -> None:
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        notes.append("Optuna plots skipped: no completed trial")
        return
    multi = len(study.directions) > 1
    metric = spec.objectives[0][0] if spec.objectives else "objective"
    target = {"target": lambda t: t.values[0], "target_name": metric} if multi else {"target_name": metric}
    # With an explicit target PED-ANOVA ranks what makes it *low*: negate a maximised first objective.
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    importance_target = ({"target": (lambda t: -t.values[0]) if maximize else (lambda t: t.values[0]),
                          "target_name": metric} if multi else {"target_name": metric})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")  # handled above
        _save(out_dir / "optuna_history.png", lambda: ovm.plot_optimization_history(study, **target),
              written, notes, "Optuna optimization history")
        has_intermediate = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
        _save(out_dir / "optuna_intermediate.png", lambda: ovm.plot_intermediate_values(study), written, notes,
              "Optuna intermediate values" if has_intermediate and not multi else None,
              skip_note="Optuna intermediate values: none reported (multi-objective or no per-epoch reports)")
        swept = {name for t in complete for name in t.params}
        enough = len(swept) > 1 and len(complete) >= 3
        _save(out_dir / "optuna_importances.png", lambda: ovm.plot_param_importances(study, **importance_target), written,
              notes, "Optuna parameter importances" if enough else None,
              skip_note=f"Optuna parameter importances: need > 1 swept parameter and >= 3 completed trials "
                        f"(have {len(swept)} and {len(complete)})")
        if multi:
            names = [m for m, _ in spec.objectives]
            _save(out_dir / "optuna_pareto.png", lambda: ovm.plot_pareto_front(study, target_names=names),
                  written, notes, "Optuna Pareto front")


def _save(path: Path, make: Callable[[], Any], written: list[Path], notes: list[str], what: str | None,
          skip_note: str | None = None) -> None:
    """Draw with `make` (a Figure or Axes) and save; `what` None means "does not apply" (skip_note, if any)."""
    if what is None:
        if skip_note:
            notes.append(skip_note)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt

    try:
        drawn = make()
        if not isinstance(drawn, matplotlib.figure.Figure):   # Optuna returns Axes (or an array of them)
            drawn = getattr(drawn, "flat", [drawn])[0].figure
        drawn.savefig(path, dpi=DPI, bbox_inches="tight")
        written.append(path)
    except Exception as error:  # noqa: BLE001 - one plot must not take the report down
        notes.append(f"{what}: skipped ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    finally:
        plt.close("all")
