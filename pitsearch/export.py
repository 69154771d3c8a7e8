"""`python -m pitsearch.export STUDY [--storage URL] [--top-k K] [--out DIR] [--force]`: best trials as configs.

For each of the best K COMPLETE trials (single objective: by value in the study's direction, ties to the
earlier trial; multi-objective: the Pareto front, `study.best_trials`, ordered by the first objective) it
writes
  DIR/rankN.yaml        the trial's full resolved config (model, data, train, tracking, eval, ... with its
                        seed; `sweep` removed) plus the `hydra:` settings of conf/config.yaml. A primary
                        config with no defaults list:
                            python -m pitsearch --config-dir DIR --config-name rankN
                        re-runs the trial; on CPU it reproduces its val/acc_best exactly (same seed, data,
                        and `train.threads` when the sweep split the cores).
  DIR/model/rankN.yaml  its model alone, a `model` group option for any data set:
                            python -m pitsearch --config-dir DIR model=rankN
                        (img_size / in_chans / num_classes are null there: they come from the data;
                        its `name` is STUDY_rankN).
DIR defaults to `<output_dir>/export` (beside `report/`; `<cwd>/pitsearch-sweeps/STUDY/export` for a sweep
with the default output_dir). A pinned `train.device: cuda:N` is exported as `cuda`.

A trial is one seed: the best trial of a seed-repeated sweep is partly the luckiest seed. Compare variants
with the report's means and paired deltas; export to re-run or to reuse an architecture.
An unknown or empty study, or one with no completed trial: one `error:` line, exit 2, nothing written. So is
a rankN.yaml in DIR that this tool did not write (its first line is not HEADER): a user's own file is never
overwritten without --force.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pitsearch.errors import ConfigError

HEADER = "# pitsearch export"   # the first line of every file this tool writes (and the only ones it overwrites)
DATA_SHAPE_KEYS = ("img_size", "in_chans", "num_classes")   # filled from the data when null


class ExportError(Exception):
    """Nothing to export; printed as one line."""


@dataclass
class Exported:
    rank: int
    trial_number: int
    values: list[float]
    variant: str
    seed: Any
    config_path: Path
    model_path: Path

    def command(self) -> str:
        return f"python -m pitsearch --config-dir {shlex.quote(str(self.config_path.parent))} --config-name {self.config_path.stem}"

    def model_command(self) -> str:
        return f"python -m pitsearch --config-dir {shlex.quote(str(self.config_path.parent))} model={self.model_path.stem}"


def rank_trials(study, top_k: int | None = None) -> list:
    """The best COMPLETE trials, best first (see the module doc); at most `top_k` when given."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) == 1:
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        ranked = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
    else:
        sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
        ranked = sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.number))
    return ranked[:top_k] if top_k else ranked


def exported_config(trial) -> dict[str, Any]:
    """The trial's stored config, runnable as a primary config: `sweep` dropped, the repo's hydra settings."""
    config = trial.user_attrs.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ExportError(f"trial {trial.number} has no stored config (user attribute `config`)")
    out = {k: v for k, v in config.items() if k not in ("sweep", "hydra")}
    train = dict(out.get("train") or {})
    if isinstance(train.get("device"), str) and re.fullmatch(r"cuda:\d+", train["device"]):
        train["device"] = "cuda"   # the worker's pinned GPU; any GPU reproduces the run
    out["train"] = train
    out["hydra"] = _hydra_settings()
    return out


def model_only(config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The model node as a group option: data-shape keys null (the data fills them), renamed when `name`."""
    model = {k: (None if k in DATA_SHAPE_KEYS else v) for k, v in config["model"].items()}
    if name and "name" in model:
        model["name"] = name   # a preset's name would claim the preset's architecture
    return model


def _hydra_settings() -> dict[str, Any]:
    """conf/config.yaml's `hydra:` node (chdir off, the run dir), so a re-run behaves like any other run."""
    import yaml

    from pitsearch.paths import CONF_DIR

    return (yaml.safe_load((CONF_DIR / "config.yaml").read_text()) or {}).get("hydra") or {}


def export_study(study, out_dir: Path, top_k: int | None = None, objective_names: list[str] | None = None,
                 force: bool = False) -> list[Exported]:
    """Write the files; raises ExportError (before creating anything) when there is nothing to export, and
    ConfigError when a rankN.yaml there is not one this tool wrote (a user's own file), unless `force`."""
    import yaml

    if not study.get_trials(deepcopy=False):
        raise ExportError(f"study {study.study_name!r} has no trials")
    ranked = rank_trials(study, top_k)
    if not ranked:
        states = ", ".join(sorted({t.state.name for t in study.get_trials(deepcopy=False)}))
        raise ExportError(f"study {study.study_name!r} has no completed trial (states: {states})")
    configs = [exported_config(t) for t in ranked]   # every config checked before anything is written
    names = objective_names or [f"objective_{i}" for i in range(len(study.directions))]
    out_dir = out_dir.resolve()
    if not force:
        for rank in range(1, len(ranked) + 1):
            for path in (out_dir / f"rank{rank}.yaml", out_dir / "model" / f"rank{rank}.yaml"):
                if path.is_file() and not _written_here(path):
                    raise ConfigError(str(path), "exists and was not written by pitsearch export; move it away "
                                                 "or pass --force to overwrite it")
    (out_dir / "model").mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir, len(ranked))
    exported = []
    for rank, (trial, config) in enumerate(zip(ranked, configs), start=1):
        item = Exported(rank=rank, trial_number=trial.number, values=list(trial.values),
                        variant=trial.user_attrs.get("variant", ""), seed=config["train"].get("seed"),
                        config_path=out_dir / f"rank{rank}.yaml", model_path=out_dir / "model" / f"rank{rank}.yaml")
        shown = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, item.values))
        about = (f"{HEADER} of study {study.study_name!r}: rank {rank} of {len(ranked)}, trial {trial.number} "
                 f"({shown}; {item.variant or 'default'}, seed {item.seed})")
        item.config_path.write_text(f"{about}\n# re-run: {item.command()}\n"
                                    + yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
        item.model_path.write_text(f"{about}\n# model only, for any data: {item.model_command()}\n"
                                   + yaml.safe_dump(model_only(config, f"{study.study_name}_rank{rank}"), sort_keys=False,
                                                    default_flow_style=None))
        exported.append(item)
    return exported


def _written_here(path: Path) -> bool:
    """Whether `path` is an export of this tool: every file it writes starts with HEADER."""
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.readline().startswith(HEADER)


def _remove_stale(out_dir: Path, count: int) -> None:
    """rankN files of an earlier, longer export (only files this tool wrote)."""
    for folder in (out_dir, out_dir / "model"):
        for path in folder.glob("rank*.yaml"):
            number = path.stem[4:]
            if number.isdigit() and int(number) > count and _written_here(path):
                path.unlink()


def parse_args(argv=None) -> argparse.Namespace:
    from pitsearch.report.source import add_study_arguments

    parser = argparse.ArgumentParser(
        prog="python -m pitsearch.export",
        description="Export a study's best trials as configs runnable with `python -m pitsearch --config-dir DIR "
                    "--config-name rankN`, and their models as `model` group options.")
    add_study_arguments(parser)
    parser.add_argument("--top-k", type=int, default=3, metavar="K",
                        help="how many trials (default 3; multi-objective: at most the Pareto front)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <output_dir>/export, e.g. ./pitsearch-sweeps/STUDY/export)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite rankN.yaml files in the output folder that this tool did not write")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.top_k < 1:
        print(f"error: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    from pitsearch.report.source import ReportSpec
    from pitsearch.search.study import StudyNotFound, open_existing_study

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"{args.out.resolve()} is a file, not a folder")
    try:
        study, storage_dir = open_existing_study(args.study, args.storage)
        spec = ReportSpec.from_study(study, storage_dir)
        out_dir = args.out or spec.output_dir / "export"
        exported = export_study(study, out_dir, args.top_k, [m for m, _ in spec.objectives], force=args.force)
    except (StudyNotFound, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for item in exported:
        print(f"rank {item.rank}: trial {item.trial_number} ({item.variant or 'default'}, seed {item.seed}) "
              f"values {', '.join(f'{v:.6g}' for v in item.values)}")
        print(f"  {item.command()}")
        print(f"  model only: {item.model_command()}")
    return 0


if __name__ == "__main__":
    from pitsearch.cli import guarded

    sys.exit(guarded(main))
