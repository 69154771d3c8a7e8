"""Tests mirror the package: a test module imports shared helpers from tests/helpers.py (fixtures come from
conftest.py, local servers from servers.py), never from another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SHARED = {"helpers", "conftest", "servers"}


def local_imports(source: str, local: set[str]) -> set[str]:
    """Which of the `local` modules `source` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(top for top in (name.split(".")[0] for name in names) if top in local)
    return found


def test_no_test_module_imports_another():
    local = {p.stem for p in TESTS.glob("*.py")}
    offenders = {p.name: sorted(local_imports(p.read_text(), local) - SHARED) for p in sorted(TESTS.glob("*.py"))}
    assert not {name: found for name, found in offenders.items() if found}


def test_the_check_finds_module_level_and_function_level_imports():
    source = "import test_a\nfrom helpers import X\n\ndef f():\n    from test_b import y\n    import os\n"
    assert local_imports(source, {"test_a", "test_b", "helpers"}) == {"test_a", "test_b", "helpers"}
