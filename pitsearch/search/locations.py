"""Where a sweep keeps its files: the one place that names them. Light: standard library only.

`<cwd>/pitsearch-sweeps/<study_name>/` (or `sweep.output_dir`) holds the journal (the default Optuna storage),
`grid.lock`, `report/` and `export/`.
"""

from __future__ import annotations

from pathlib import Path

SWEEPS_DIR = "pitsearch-sweeps"
JOURNAL_NAME = "optuna-journal.log"
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")   # what `sweep.storage` may end with to name a journal file


def default_sweep_dir(study_name: str, cwd: str | Path | None = None) -> Path:
    """`<cwd>/pitsearch-sweeps/<study>`: where a sweep with `output_dir: null` keeps its journal and report."""
    return Path(cwd or Path.cwd()).resolve() / SWEEPS_DIR / study_name


def journal_file(output_dir: str | Path) -> Path:
    """The default storage of a sweep: a journal file in its output folder."""
    return Path(output_dir) / JOURNAL_NAME
