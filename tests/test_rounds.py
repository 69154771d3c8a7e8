"""Seeds until decided (pitsearch.search.rounds): the rounds an adaptive grid opens, replayed from its trials."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from pitsearch.errors import ConfigError
from pitsearch.search.grid import grid_state
from pitsearch.search.rounds import RoundPrinter, opened_cells, replay
from pitsearch.search.spec import parse_sweep
from pitsearch.search.trials import sweep_status

NODE = {"study_name": "adaptive", "objectives": [{"metric": "val/acc_best", "direction": "maximize"}],
        "sampler": {"name": "grid"}, "seeds": {"min": 2, "max": 4, "min_effect": 0.05},
        "space": {"model.pool": {"choices": ["conv", "none", "avg"]}}, "baseline": {"model.pool": "none"}}
# Baseline none at 0.5; conv +0.1 on every seed (sd 0: decided at the first look); avg alternates +-0.1 (open).
VALUE = {"none": lambda s: 0.5, "conv": lambda s: 0.6, "avg": lambda s: 0.5 + (0.1 if s % 2 else -0.1)}


def spec_of(**seeds):
    return parse_sweep({**NODE, "seeds": {**NODE["seeds"], **seeds}}, base_dir="/tmp")


def study_with(cells, failed=()):
    study = optuna.create_study(direction="maximize")
    dists = {"model.pool": CategoricalDistribution(["conv", "none", "avg"]), "train.seed": IntDistribution(0, 3)}
    for pool, seed in cells:
        study.add_trial(optuna.create_trial(params={"model.pool": pool, "train.seed": seed}, distributions=dists,
                                            value=VALUE[pool](seed)))
    for pool, seed in failed:
        study.add_trial(optuna.create_trial(params={"model.pool": pool, "train.seed": seed}, distributions=dists,
                                            state=TrialState.FAIL, user_attrs={"fail_reason": "boom"}))
    return study


def opened(study, spec):
    return {v: s for v, s in replay(study.get_trials(), spec).opened.items()}


def test_round_one_opens_min_seeds_of_every_variant_and_waits_for_them():
    spec = spec_of()
    assert spec.n_trials == 12 and spec.space.grid_size == 12   # the most cells the rounds can open
    study = study_with([("none", 0), ("conv", 0)])
    rounds = replay(study.get_trials(), spec)
    assert not rounds.settled and len(rounds.rounds) == 1
    assert rounds.opened == {"model.pool=conv": [0, 1], "model.pool=none": [0, 1], "model.pool=avg": [0, 1]}
    state = grid_state(study, spec.space, None, opened_cells(spec))
    assert len(state.cells) == 6 and len(state.pending) == 4


def test_decided_variants_get_no_more_seeds_undecided_ones_and_the_baseline_do():
    spec = spec_of()
    first = [(p, s) for p in ("conv", "none", "avg") for s in (0, 1)]
    rounds = replay(study_with(first).get_trials(), spec)
    assert rounds.decisions == {"model.pool=conv": "better", "model.pool=avg": "continue"}
    assert rounds.opened["model.pool=conv"] == [0, 1]
    assert rounds.opened["model.pool=avg"] == rounds.opened["model.pool=none"] == [0, 1, 2]
    status = sweep_status(study_with(first), spec)
    assert status.total == 8 and status.done == 6 and status.startable and not status.complete
    lines = []
    RoundPrinter(spec, lines.append)(study_with(first))
    assert lines == ["round 1: seeds 0-1 for every variant (3)",
                     "round 2: seed 2 added to model.pool=none, model.pool=avg (undecided: model.pool=avg)"]


def test_max_seeds_stops_the_rounds_and_the_sweep_is_complete():
    spec = spec_of()
    cells = ([(p, s) for p in ("conv", "none", "avg") for s in (0, 1)]
             + [(p, s) for p in ("none", "avg") for s in (2, 3)])
    study = study_with(cells)
    rounds = replay(study.get_trials(), spec)
    assert rounds.finished and rounds.decisions == {"model.pool=conv": "better", "model.pool=avg": "undecided"}
    assert rounds.opened["model.pool=avg"] == [0, 1, 2, 3]
    status = sweep_status(study, spec)
    assert status.complete and status.done == status.total == 10
    assert replay(list(reversed(study.get_trials())), spec).opened == rounds.opened   # order-free: deterministic


def test_a_failed_cell_blocks_its_round_until_it_has_no_attempts_left():
    spec = spec_of()
    first = [(p, s) for p in ("conv", "none", "avg") for s in (0, 1) if (p, s) != ("avg", 1)]
    assert not replay(study_with(first, failed=[("avg", 1)]).get_trials(), spec).settled
    rounds = replay(study_with(first, failed=[("avg", 1)] * 3).get_trials(), spec)
    # Failed out: decided on the one pair left (no interval yet: continue) and avg gets seed 2.
    assert len(rounds.rounds) == 2 and rounds.opened["model.pool=avg"] == [0, 1, 2]


@pytest.mark.parametrize("seeds, baseline, key", [
    ({"min": 1, "max": 4}, {"model.pool": "none"}, "sweep.seeds.min"),
    ({"min": 3, "max": 2}, {"model.pool": "none"}, "sweep.seeds.max"),
    ({"min": 2, "max": 4, "min_effect": -1}, {"model.pool": "none"}, "sweep.seeds.min_effect"),
    ({"min": 2, "max": 4, "alpha": 1.5}, {"model.pool": "none"}, "sweep.seeds.alpha"),
    ({"min": 2, "max": 4, "mx": 3}, {"model.pool": "none"}, "sweep.seeds.mx"),
    ({"min": "2", "max": 4}, {"model.pool": "none"}, "sweep.seeds.min"),
    ({"min": 2, "max": 4}, {}, "sweep.baseline"),
    ({"min": 2, "max": 4}, {"model.pool": "max"}, "sweep.baseline"),
])
def test_bad_adaptive_seeds_are_one_config_error(seeds, baseline, key):
    with pytest.raises(ConfigError) as error:
        parse_sweep({**NODE, "seeds": seeds, "baseline": baseline}, base_dir="/tmp")
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


def test_the_adaptive_form_needs_the_grid_sampler():
    with pytest.raises(ConfigError, match="sweep.seeds"):
        parse_sweep({**NODE, "sampler": {"name": "random"}, "n_trials": 5}, base_dir="/tmp")


def test_the_report_decides_on_the_sweeps_design_with_the_seeds_both_variants_have():
    from pitsearch.report.decisions import decide_one, design_from
    from pitsearch.report.tables import Comparison
    from pitsearch.stats import paired_delta

    design = design_from({"seeds": {"min": 2, "max": 4, "alpha": 0.1}}, [("val/loss", "minimize")])
    assert (design.metric, design.direction, design.alpha, design.adaptive) == ("val/loss", "minimize", 0.1, True)
    # The baseline ran 4 seeds (its other comparisons stayed open), this variant 2 (decided): 2 pairs.
    comparison = Comparison("pool=conv", "pool=none", {"val/loss": paired_delta(
        {0: 1.0, 1: 1.1, 2: 0.9, 3: 1.0}, {0: 0.8, 1: 0.9})})
    verdict = decide_one(comparison, design)
    assert verdict.n == 2 and verdict.kind == "better" and "90% sequential CI, 2 seeds" in verdict.text
