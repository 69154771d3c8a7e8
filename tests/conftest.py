"""Fixtures (compose configs in-process) and the gpu marker's skip; shared helpers live in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from pitsearch.paths import CONF_DIR

from helpers import TINY  # noqa: F401  (re-exported: `from conftest import TINY` still works)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def compose(tmp_path, monkeypatch):
    """compose(overrides) -> the resolved config dict, as `python -m pitsearch` would build it, cwd = tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)

    def _compose(overrides=(), config_dir=None):
        with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)

    return _compose
