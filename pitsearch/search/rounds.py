"""Seeds until decided: which seeds an adaptive grid (`sweep.seeds: {min, max, min_effect}`) has opened so far.

Round 1 opens seeds start..start+min-1 of every variant. Once every opened cell is settled (finished, or failed
with no attempts left), each non-baseline variant is compared with its baseline counterpart on the primary
objective by `pitsearch.sequential.decide`, on the seeds both finished; the next round opens the next seed for
the variants still at "continue" and for their baseline (a delta needs both runs). It ends when every comparison
is decided or has max seeds opened ("undecided").

The rounds are replayed from the study's trials on every call, not stored: a pure function of the trials and
the spec, so every worker on every machine derives the same cells, and nothing can get out of step with the
study after a kill (there is no second record to update). Replaying is cheap (one `decide` per comparison and
round; the boundaries are cached) and a decision once taken never changes, since a round is only read once all
its cells are settled and a settled cell never changes (pitsearch.search.grid retries only cells with attempts
left, and those do not count as settled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from pitsearch.search.overrides import to_plain
from pitsearch.search.space import SEED_PATH


@dataclass(frozen=True)
class AdaptiveSeeds:
    """The parsed dict form of `sweep.seeds`."""

    min: int
    max: int
    min_effect: float = 0.0
    alpha: float = 0.05
    start: int = 0

    @property
    def seeds(self) -> list[int]:
        return list(range(self.start, self.start + self.max))


@dataclass
class Round:
    number: int
    seed: int                      # the seed this round added (round 1: the last of the first `min`)
    variants: list[str]            # variants that got it (baseline included)
    decisions: dict[str, str] = field(default_factory=dict)   # variant -> kind, after this round


@dataclass
class Rounds:
    """The replayed rounds: `opened` maps each variant key to its opened seeds (a prefix of the seed axis)."""

    opened: dict[str, list[int]]
    rounds: list[Round]
    settled: bool                  # every opened cell is settled
    decisions: dict[str, str]      # the latest decision kind of each compared variant ("continue": not yet)
    finished: bool                 # settled and nothing left to open: the sweep is complete

    def cells(self, space) -> set[frozenset]:
        """Cell keys (`SearchSpace.cell_key` of the encoded values) of every opened cell."""
        keys = set()
        for values in space.iter_cells():
            if values.get(SEED_PATH) in self.opened.get(space.variant_key(values), ()):
                keys.add(space.cell_key(space.encode(values)))
        return keys


def variants_and_pairs(space, baseline: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Every variant key of the space (in grid order), and each compared variant's baseline counterpart: the
    same values except the baseline's parameters, which take the baseline's values (as the report pairs them)."""
    baseline = {k: to_plain(v) for k, v in baseline.items()}
    rows: dict[str, dict[str, Any]] = {}
    for values in space.iter_cells():
        rest = {k: to_plain(v) for k, v in values.items() if k != SEED_PATH}
        rows.setdefault(space.variant_key(values), rest)
    by_values = {repr(sorted(v.items())): key for key, v in rows.items()}
    pairs = {}
    for key, values in rows.items():
        counterpart = {**values, **{k: v for k, v in baseline.items() if k in values}}
        base = by_values.get(repr(sorted(counterpart.items())))
        if base is not None and base != key:
            pairs[key] = base
    return list(rows), pairs


def replay(trials: Sequence[FrozenTrial], spec) -> Rounds:
    """The rounds an adaptive grid has opened, from its trials (see the module docstring)."""
    from pitsearch.search.grid import DUPLICATE, INTERRUPTED, MAX_CELL_ATTEMPTS
    from pitsearch.search.trials import FINISHED_STATES
    from pitsearch.sequential import decide

    design: AdaptiveSeeds = spec.adaptive
    space = spec.space
    seeds = design.seeds
    direction = spec.objectives[0][1]
    variants, pairs = variants_and_pairs(space, spec.baseline)
    # Each (variant, seed): its objective value when finished (None: PRUNED, no value), or whether it failed out.
    value: dict[tuple[str, int], float | None] = {}
    failures: dict[tuple[str, int], int] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.user_attrs.get(DUPLICATE):
            continue
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        if SEED_PATH not in params:
            continue
        values = space.decode(params)
        cell = (space.variant_key(values), values[SEED_PATH])
        if trial.state in FINISHED_STATES and cell not in value:
            value[cell] = trial.values[0] if trial.state == TrialState.COMPLETE and trial.values else None
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason") != INTERRUPTED:
            failures[cell] = failures.get(cell, 0) + 1

    def settled(cell) -> bool:
        return cell in value or failures.get(cell, 0) >= MAX_CELL_ATTEMPTS

    opened = {v: seeds[:design.min] for v in variants}
    rounds = [Round(1, seeds[design.min - 1], list(variants))]
    decisions = {v: "continue" for v in pairs}
    while True:
        if not all(settled((v, s)) for v, opened_seeds in opened.items() for s in opened_seeds):
            return Rounds(opened, rounds, settled=False, decisions=decisions, finished=False)
        for variant, base in pairs.items():
            if decisions[variant] != "continue":
                continue   # decided in an earlier round: no more seeds, and its decision stands
            deltas = [value[(variant, s)] - value[(base, s)] for s in opened[variant]
                      if value.get((variant, s)) is not None and value.get((base, s)) is not None]
            kind = decide(deltas, min_seeds=design.min, max_seeds=design.max, min_effect=design.min_effect,
                          alpha=design.alpha, direction=direction).kind
            # Failed seeds leave fewer deltas than seeds: at max seeds opened there is still no seed to add.
            decisions[variant] = "undecided" if kind == "continue" and len(opened[variant]) >= design.max else kind
        rounds[-1].decisions = dict(decisions)
        going = [v for v in pairs if decisions[v] == "continue"]
        if not going:
            return Rounds(opened, rounds, settled=True, decisions=decisions, finished=True)
        grow = sorted(set(going) | {pairs[v] for v in going}, key=variants.index)
        seed = seeds[max(len(opened[v]) for v in grow)]
        for v in grow:   # each variant's seeds stay a prefix: a baseline shared with a decided variant catches up
            opened[v] = seeds[:seeds.index(seed) + 1]
        rounds.append(Round(len(rounds) + 1, seed, grow))


def opened_cells(spec):
    """The hook pitsearch.search.grid takes: the trials -> the opened cells (None: not an adaptive grid)."""
    if getattr(spec, "adaptive", None) is None:
        return None
    return lambda trials: replay(trials, spec).cells(spec.space)


# A worker with nothing to start while a round's last cells run elsewhere polls this often: a check replays the
# study (milliseconds for hundreds of trials), and a new round should not wait long for a trial of seconds.
ROUND_POLL_S = 1.5


def round_may_open(study, spec) -> bool:
    """Whether a worker with nothing to start should wait instead of exiting: the current round is not settled,
    cells of it run (on any worker or machine), and its outcome may still open seeds (a comparison is open and
    below max). Waiting, not exiting: every worker (spawned, in-process, or on another machine) runs this one
    loop, so no runner has to restart workers per round, and a worker exits exactly when a plain grid's would.
    A round blocked only by failed cells (retried by the next run) does not wait: nothing would unblock it."""
    if getattr(spec, "adaptive", None) is None:
        return False
    trials = study.get_trials(deepcopy=False)
    if not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    rounds = replay(trials, spec)
    return not rounds.settled and any(kind == "continue" and len(rounds.opened[v]) < spec.adaptive.max
                                      for v, kind in rounds.decisions.items())


class RoundPrinter:
    """The console's round lines, printed as rounds open (polled by the runner's monitor), then the decisions."""

    def __init__(self, spec, emit):
        self.spec, self.emit, self.shown, self.done = spec, emit, 0, False

    def __call__(self, study) -> None:
        if getattr(self.spec, "adaptive", None) is None or self.done:
            return
        rounds = replay(study.get_trials(deepcopy=False), self.spec)
        for line in round_lines(rounds, self.shown, self.spec.adaptive):
            self.emit(line)
        self.shown = len(rounds.rounds)
        if rounds.finished:
            self.emit(decisions_line(rounds))
            self.done = True


def round_lines(rounds: Rounds, shown: int, design: AdaptiveSeeds) -> list[str]:
    """One console line per round, from round `shown + 1` on."""
    lines = []
    for r in rounds.rounds[shown:]:
        if r.number == 1:
            lines.append(f"round 1: seeds {design.start}-{r.seed} for every variant ({len(r.variants)})")
            continue
        going = [v for v, kind in rounds.rounds[r.number - 2].decisions.items() if kind == "continue"]
        lines.append(f"round {r.number}: seed {r.seed} added to {', '.join(r.variants)} (undecided: "
                     f"{', '.join(going)})")
    return lines


def decisions_line(rounds: Rounds) -> str:
    """After the last round: each comparison's decision and the seeds it took."""
    return "decisions: " + ("; ".join(f"{v}: {kind} ({len(rounds.opened[v])} seeds)"
                                      for v, kind in rounds.decisions.items()) or "no comparison")
