"""The answer one click away: report.html (self-contained, decisions first), the decision sentences
(pitsearch.sequential.decide on the paired deltas), the paired t-test p beside the sign-flip p, the parent run's
per-variant mean curves, MACs in M units, and the sweep's last line linking to the report page in MLflow's
Model-training view. In-process, on studies built from `create_trial` (seconds, no training)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import PNG_SIGNATURE, SWEEP, add_trial, read_csv, synthetic_study
from scipy import stats as sps

MODEL_TRAINING = "workflowType=machine_learning"


def console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=120, soft_wrap=True)   # soft wrap, as pitsearch.console makes it


def lines_of(con) -> list[str]:
    return [line for line in con.file.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from pitsearch.report import write_report
    from pitsearch.report.source import ReportSpec

    cwd = tmp_path_factory.mktemp("html")
    study = synthetic_study(cwd)
    con = console()
    report = write_report(study, ReportSpec.from_study(study, cwd / "pitsearch-sweeps" / "synth"), console=con)
    return study, report, con


def test_report_html_is_self_contained_with_decisions_first_and_the_tables(synthetic):
    import html

    _, report, _ = synthetic
    page = (report.out_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)       # nothing fetched from anywhere
    assert "<script" not in page and "<link" not in page and "<iframe" not in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    pngs = sorted(p.name for p in report.out_dir.glob("*.png"))
    assert len(images) == len(pngs) >= 5
    for src in images:                                           # every figure inline, a real PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    texts = [v.text for v in report.decisions]
    assert len(texts) == 2 and all(html.escape(t, quote=False) in page for t in texts)
    assert page.index(html.escape(texts[0], quote=False)) < page.index("<h2>Variants")   # the answer first
    assert page.count("<table>") == 3 and "<th>p (t-test)</th>" in page and "<th>p (sign flip)</th>" in page
    markdown = (report.out_dir / "report.md").read_text()
    assert markdown.index(texts[0]) < markdown.index("## Variants") and "| p (t-test) |" in markdown


def test_decisions_are_the_sequential_rule_at_one_look_equal_to_the_t_interval(synthetic):
    from pitsearch.sequential import decide

    _, report, con = synthetic
    rows = {r["variant"]: r for r in read_csv(report.out_dir / "deltas.csv") if r["metric"] == "val/acc_best"}
    kinds = {}
    for comparison, verdict in zip(report.comparisons, report.decisions):
        deltas = comparison.deltas["val/acc_best"].deltas
        n = len(deltas)
        expected = decide(deltas, min_seeds=n, max_seeds=n, variant=comparison.variant, baseline=comparison.baseline)
        assert (verdict.kind, verdict.n) == (expected.kind, n)
        # One look spends all of alpha at once: decide's interval is the fixed-n t interval of the deltas table.
        assert verdict.half_width == pytest.approx(float(rows[comparison.variant]["ci95"]), rel=1e-9)
        assert "(95% t CI, " in verdict.text and "sequential" not in verdict.text
        kinds[comparison.variant] = verdict.kind
    assert kinds == {"model.pool=conv model.depths=[1,1,1]": "better", "model.pool=conv model.depths=[1,2,1]": "worse"}
    printed = lines_of(con)
    assert printed[0].startswith("decision (val/acc_best): ") and printed[1].startswith("decision (val/acc_best): ")


def test_an_adaptive_sweep_decides_on_its_own_schedule_and_one_seed_decides_nothing():
    from pitsearch.report.decisions import decide_one, design_from
    from pitsearch.report.tables import Comparison
    from pitsearch.sequential import decide
    from pitsearch.stats import paired_delta

    deltas = [0.011, 0.013, 0.009, 0.012]
    comparison = Comparison("pool=conv", "pool=none", {"val/acc_best": paired_delta(
        dict(enumerate([0.5] * 4)), {i: 0.5 + d for i, d in enumerate(deltas)})})
    design = design_from({"seeds": {"min": 3, "max": 12, "min_effect": 0.05}}, [("val/acc_best", "maximize")])
    verdict = decide_one(comparison, design)
    expected = decide(deltas, min_seeds=3, max_seeds=12, min_effect=0.05, variant="pool=conv", baseline="pool=none")
    assert (verdict.kind, verdict.text) == (expected.kind, expected.text) and "sequential CI" in verdict.text
    assert design_from({"seeds": [0, 1, 2]}, []).min_effect == 0 and not design_from({"seeds": [0]}, []).adaptive

    one = Comparison("pool=conv", "pool=none", {"val/acc_best": paired_delta({0: 0.5}, {0: 0.52})})
    verdict = decide_one(one, design_from(None, []))
    assert verdict.kind == "no interval" and "+0.020 on 1 seed" in verdict.text


def test_deltas_csv_has_the_paired_t_test_p(synthetic):
    study, report, _ = synthetic
    for row in read_csv(report.out_dir / "deltas.csv"):
        deltas = np.array([float(x) for x in row["deltas"].split()])
        if deltas.std() == 0:
            continue
        assert float(row["p_t_test"]) == pytest.approx(sps.ttest_1samp(deltas, 0.0).pvalue, rel=1e-6)


def test_the_macs_axis_is_in_m_units_without_an_offset():
    from pitsearch.report.figures import accuracy_macs_figure

    points = {"a": (5.2e6, [0.90, 0.91]), "b": (1.31e7, [0.93, 0.94]), "c": (1.52e7, [0.92, 0.95])}
    figure = accuracy_macs_figure(points, title="t")
    ax = figure.axes[0]
    figure.canvas.draw()
    assert ax.get_xlabel() == "MACs (M)"
    assert ax.xaxis.get_offset_text().get_text() == ""            # no "1e7" in the corner
    ticks = [float(t.get_text().replace("\u2212", "-")) for t in ax.get_xticklabels() if t.get_text()]
    assert ticks and max(ticks) < 100 and any(5 <= t <= 15 for t in ticks)


def test_metric_keys_are_legal_in_mlflow_for_any_variant_label():
    from mlflow.utils.validation import _validate_metric_name

    from pitsearch.report.tables import metric_key

    for label in ("model.pool=conv model.depths=[1,1,1]", "data.root=/x//y/../z", "a:b/", "x" * 400):
        key = metric_key("variant", label, "val/acc")
        _validate_metric_name(key)
        assert key.endswith("/val/acc") and len(key) <= 250 and ":" not in key
    assert metric_key("variant", "x" * 400, "val/acc") != metric_key("variant", "x" * 399 + "y", "val/acc")


def test_tracker_links_open_the_model_training_view_and_mask_the_password():
    from pitsearch.tracking import Tracker

    tracker = object.__new__(Tracker)          # no server to reach: only the URL helpers are used
    tracker.uri, tracker.experiment_id = "https://bob:s3cret@mlflow.example:5000/", "7"
    assert tracker.run_url("abc") == f"#/experiments/7/runs/abc?{MODEL_TRAINING}"
    line = tracker.browse_line(tracker.artifact_url("abc", "report/report.html"))
    assert line == (f"browse: https://bob:***@mlflow.example:5000/#/experiments/7/runs/abc/artifacts/report/"
                    f"report.html?{MODEL_TRAINING}")
    tracker.uri = "databricks"
    assert tracker.browse_line(tracker.run_url("abc")) is None


# ------------------------------------------------------------------------------------------ the sweep's end


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A grid study (pool conv / none x seeds 0, 1) with `trials` of its 4 cells complete, its spec, a tracker."""
    from pitsearch.search.spec import parse_sweep
    from pitsearch.search.storage import make_storage
    from pitsearch.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    spec = parse_sweep(SWEEP, base_dir=tmp_path)
    study = optuna.create_study(study_name="rep", direction="maximize", storage=make_storage(None, spec.output_dir))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "rep")
    return study, spec, tracker, tracker.start_run(run_name="rep")


def finish(study, spec, tracker, parent, trained=True) -> list[str]:
    from pitsearch.report.sweep import StudyReporter
    from pitsearch.search.runner import finish_sweep

    con = console()
    finish_sweep(study, spec, tracker, parent, con, StudyReporter(), interrupted=False, trained=trained)
    return lines_of(con)


def test_a_sweep_ends_on_a_link_to_its_report_page_and_the_parent_run_draws_the_variant_curves(sweep):
    from mlflow.tracking import MlflowClient

    study, spec, tracker, parent = sweep
    for pool in ("conv", "none"):
        for seed in (0, 1):
            add_trial(study, pool, seed)
    page = f"#/experiments/{tracker.experiment_id}/runs/{parent}/artifacts/report/report.html?{MODEL_TRAINING}"
    printed = finish(study, spec, tracker, parent)
    assert printed[-1] == f"browse: mlflow ui --backend-store-uri {tracker.uri}  then open http://127.0.0.1:5000/{page}"
    assert printed[0].startswith("decision (val/acc_best): model.pool=conv is better than model.pool=none")
    client = MlflowClient(tracker.uri)
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}

    def curve(key):
        return [(m.step, round(m.value, 9)) for m in sorted(client.get_metric_history(parent, key),
                                                              key=lambda m: m.step)]

    assert curve("variant/model.pool_conv/val/acc") == [(0, 0.5), (1, 0.855)]   # one point per epoch, mean of 2
    assert curve("variant/model.pool_none/train/loss") == [(0, 1.0), (1, 0.5)]

    # Run again, study complete: nothing is written, the link is still the last line, no point is added.
    assert finish(study, spec, tracker, parent, trained=False)[-1].endswith(page)
    (spec.output_dir / "report" / "report.html").unlink()   # a report from before report.html existed
    assert finish(study, spec, tracker, parent, trained=False)[-1].endswith(page)
    assert (spec.output_dir / "report" / "report.html").is_file()
    assert curve("variant/model.pool_conv/val/acc") == [(0, 0.5), (1, 0.855)]


def test_an_unfinished_sweep_links_its_parent_run_page(sweep):
    study, spec, tracker, parent = sweep
    add_trial(study, "conv", 0)
    last = finish(study, spec, tracker, parent)[-1]
    assert last.endswith(f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{parent}?{MODEL_TRAINING}")
    assert not (spec.output_dir / "report").exists()
