"""README's examples work as written: the sweep file example parses, and CI runs README's own commands."""

from __future__ import annotations

import re

from pitsearch.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_readme_sweep_example_is_a_valid_sweep_file(compose, tmp_path):
    from pitsearch.search.runner import config_paths
    from pitsearch.search.spec import parse_sweep

    blocks = re.findall(r"```yaml\n(# @package _global_\n.*?)```", README, flags=re.S)
    assert blocks, "README lost its sweep file example"
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "readme_example.yaml").write_text(blocks[0])
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "+sweep=readme_example"])
    spec = parse_sweep(cfg["sweep"], known_paths=config_paths(cfg))
    assert spec.study_name == "my_sweep"
    assert set(spec.space.names) >= {"model.pool", "model.depths", "train.lr", "model.drop_path", "train.seed"}
    for overrides in spec.space.example_overrides():
        compose([f"hydra.searchpath=[file://{tmp_path}]", "+sweep=readme_example", *overrides])


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "ci:$1" in ci and "readme_command install" in ci and "readme_command test" in ci
    assert re.search(r"<!-- ci:install -->\n```bash\npip install -e \"\.\[dev\]\"\n```", README)
    assert re.search(r"<!-- ci:test -->\n```bash\npython -m pytest\n```", README)
