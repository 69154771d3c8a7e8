"""The package's shape: dependencies point one way, and each shared concept is imported from its one home.

Parses every module's imports (module level and inside functions alike) with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pitsearch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported pitsearch module, names imported from it) for every import statement."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "pitsearch":   # from pitsearch import data
                found += [(module, f"pitsearch.{alias.name}", []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pitsearch"):
                found.append((module, node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.Import):
                found += [(module, alias.name, []) for alias in node.names if alias.name.startswith("pitsearch")]
    return found


IMPORTS = _imports()


def _edges(source_prefix: str, target_prefix: str) -> list[str]:
    return sorted({f"{a} -> {b}" for a, b, _ in IMPORTS
                   if (a == source_prefix or a.startswith(source_prefix + "."))
                   and (b == target_prefix or b.startswith(target_prefix + "."))})


def test_the_parser_sees_the_package_edges_it_should():
    # A guard for the guard: edges known to exist are found, so an empty result below means something.
    assert _edges("pitsearch.report", "pitsearch.search")
    assert _edges("pitsearch.data", "pitsearch.imagefolder")


@pytest.mark.parametrize("source, target", [
    ("pitsearch.search", "pitsearch.report"),    # the report reads studies; a sweep is handed a reporter
    ("pitsearch.augment", "pitsearch.data"),     # data hands batches to augment, not the other way
    ("pitsearch.models", "pitsearch.search"),    # models are layers: they know nothing of sweeps,
    ("pitsearch.models", "pitsearch.experiment"),
    ("pitsearch.models", "pitsearch.report"),
    ("pitsearch.train", "pitsearch.search"),     # the trainer knows nothing of Optuna
    ("pitsearch.train", "pitsearch.experiment"),
    ("pitsearch.runstate", "pitsearch"),         # the run-state vocabulary is a leaf
    ("pitsearch.masking", "pitsearch"),
    ("pitsearch.urls", "pitsearch"),
])
def test_dependencies_point_one_way(source, target):
    assert _edges(source, target) == []


@pytest.mark.parametrize("name, home", [
    ("mask_url", "pitsearch.masking"),
    ("mask_secrets", "pitsearch.masking"),
    ("sqlite_path", "pitsearch.urls"),
    ("RunState", "pitsearch.runstate"),
    ("StopRun", "pitsearch.runstate"),
    ("BatchAugment", "pitsearch.augment"),
    ("WorkerContext", "pitsearch.search.trial"),
    ("FINISHED_STATES", "pitsearch.search.trials"),
    ("EXIT_TRIALS_FAILED", "pitsearch.cli"),
    ("to_plain", "pitsearch.search.overrides"),
    ("hydra_value", "pitsearch.search.overrides"),
    ("default_sweep_dir", "pitsearch.search.locations"),
    ("open_existing_study", "pitsearch.search.study"),
])
def test_a_shared_name_is_imported_from_its_one_home(name, home):
    wrong = sorted({f"{a} imports {name} from {b}" for a, b, names in IMPORTS if name in names and b != home})
    assert wrong == []


def test_sqlite_urls_are_parsed_in_one_place():
    slicing = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if 'len("sqlite:///")' in path.read_text() or "partition(\":///\")" in path.read_text()]
    assert slicing == ["urls.py"]


def test_processes_lock_files_in_one_place():
    """pitsearch.filelock is the one flock (the journal's own lock is Optuna's)."""
    flocking = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                      if "fcntl.flock(" in path.read_text())
    assert flocking == ["filelock.py"]


def test_the_sampler_and_pruner_are_built_by_parse_sweep_alone():
    callers = sorted({a for a, _, names in IMPORTS if {"make_sampler", "make_pruner"} & set(names)})
    assert callers == ["pitsearch.search.spec"]


def test_the_journal_file_is_named_in_one_place():
    """Code names the journal file once (pitsearch.search.locations); help texts may show the path."""
    named = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and node.value == "optuna-journal.log")
    assert named == ["search/locations.py"]


def test_the_sweep_runner_and_the_search_space_import_no_torch_mlflow_or_timm():
    """`pitsearch.search.runner` decides the order of a sweep; training (torch) and MLflow load when a sweep
    gets that far, so a bad sweep file is refused without paying for them."""
    code = ("import sys, pitsearch.search.runner, pitsearch.search.space, pitsearch.report.source; "
            "print(sorted(m for m in ('torch', 'mlflow', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
