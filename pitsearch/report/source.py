"""Where a report's inputs come from: the study (opened read-only by pitsearch.search.study.open_existing_study)
and what the report needs to know of its sweep (objectives, swept parameters, baseline, output directory).

At the end of a sweep that is the `SweepSpec`; `write_report` stores its `sweep:` node in the study
(user attribute `sweep_spec`), so `python -m pitsearch.report` later reads the same thing back. Older
studies fall back on the `sweep` node inside any trial's stored config, then on the trials' params.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitsearch.errors import ConfigError
from pitsearch.search.locations import default_sweep_dir

SWEEP_SPEC_ATTR = "sweep_spec"
OUTPUT_DIR_ATTR = "output_dir"


@dataclass
class ReportSpec:
    """What a report needs to know about its sweep."""

    study_name: str
    objectives: list[tuple[str, str]]
    output_dir: Path
    baseline: dict[str, Any] = field(default_factory=dict)
    space: Any = None                      # pitsearch.search.space.SearchSpace, when known
    sweep_node: dict[str, Any] | None = None

    @classmethod
    def from_sweep(cls, spec) -> ReportSpec:
        """From a `SweepSpec` (or anything else with its fields)."""
        if isinstance(spec, ReportSpec):
            return spec
        return cls(study_name=spec.study_name, objectives=list(spec.objectives), output_dir=Path(spec.output_dir),
                   baseline=dict(spec.baseline or {}), space=spec.space, sweep_node=dict(spec.raw or {}))

    @classmethod
    def from_study(cls, study, storage_dir: Path | None = None, cwd: str | Path | None = None) -> ReportSpec:
        """Rebuilt from the study: its stored sweep node, else a trial's config, else its params."""
        from pitsearch.search.space import parse_space
        from pitsearch.search.study import parse_objectives

        node = study.user_attrs.get(SWEEP_SPEC_ATTR) or _node_from_trials(study)
        output_dir = _output_dir(study, node, storage_dir, cwd)
        if node:
            try:
                return cls(study_name=study.study_name, objectives=parse_objectives(node.get("objectives")),
                           output_dir=output_dir, baseline=dict(node.get("baseline") or {}),
                           space=parse_space(node.get("space") or {}, seeds=node.get("seeds")), sweep_node=node)
            except ConfigError:
                pass  # a node this version cannot parse: fall back on what the trials say
        names = list(getattr(study, "metric_names", None) or [])
        objectives = [(names[i] if i < len(names) else f"objective_{i}", d.name.lower())
                      for i, d in enumerate(study.directions)]
        return cls(study_name=study.study_name, objectives=objectives, output_dir=output_dir)

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Stored Optuna params -> the config values (lists were stored as JSON strings)."""
        if self.space is not None:
            return self.space.decode(params)
        return {k: _json_or_value(v) for k, v in params.items()}


def _node_from_trials(study) -> dict[str, Any] | None:
    for trial in study.get_trials(deepcopy=False):
        node = (trial.user_attrs.get("config") or {}).get("sweep")
        if isinstance(node, dict):
            return node
    return None


def _output_dir(study, node, storage_dir: Path | None, cwd) -> Path:
    stored = study.user_attrs.get(OUTPUT_DIR_ATTR) or (node or {}).get("output_dir")
    if stored and Path(stored).is_absolute() and Path(stored).is_dir():
        return Path(stored)
    return storage_dir or default_sweep_dir(study.study_name, cwd)


def _json_or_value(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_baseline(items: list[str]) -> dict[str, Any]:
    """`["model.pool=none", "model.depths=[1,1,1]"]` -> {path: value}; values parse as YAML (as Hydra reads them)."""
    import yaml

    baseline = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError("--baseline", f"{item!r} is not PATH=VALUE (e.g. model.pool=none)")
        baseline[path.strip()] = yaml.safe_load(text) if text.strip() else None
    return baseline


def add_study_arguments(parser) -> None:
    """The `STUDY [--storage URL]` arguments every command that opens a finished study takes."""
    parser.add_argument("study", help="the study name (sweep.study_name)")
    parser.add_argument("--storage", default=None,
                        help="journal file or Optuna storage URL (default: the journal in "
                             "./pitsearch-sweeps/STUDY/optuna-journal.log)")
