"""Compose each trial's config with Hydra: the command line's overrides, then the trial's.

Captured once inside the `hydra.main` job (config name, extra config dirs, command-line overrides) as plain
data, so a spawned worker process, or a worker on another machine, composes exactly what the parent would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pitsearch.errors import ConfigError
from pitsearch.paths import CONF_DIR


@dataclass
class TrialComposer:
    config_name: str = "config"
    config_dir: str = str(CONF_DIR)
    extra_search_paths: list[str] = field(default_factory=list)   # from --config-dir / hydra.searchpath
    overrides: list[str] = field(default_factory=list)            # the command line's, e.g. +sweep=NAME train.epochs=1

    @classmethod
    def from_hydra(cls) -> "TrialComposer":
        """Inside a `hydra.main` job: what this invocation composed from."""
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        main_dir = str(CONF_DIR)
        extra = []
        for source in hydra_cfg.runtime.config_sources:
            if source.provider == "main":
                main_dir = source.path
            elif source.schema == "file" and source.provider not in ("hydra",) and source.path:
                extra.append(source.path)
        # A user's hydra.searchpath override is kept in `overrides` already; skip its copies in `extra`.
        return cls(config_name=hydra_cfg.job.config_name or "config", config_dir=main_dir,
                   extra_search_paths=extra, overrides=list(hydra_cfg.overrides.task))

    def compose(self, trial_overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """The resolved config (a plain dict) for the command line plus `trial_overrides`."""
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.errors import HydraException
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        overrides = list(self.overrides) + list(trial_overrides)
        try:
            if GlobalHydra.instance().is_initialized():  # inside the hydra.main job: its search path is set
                cfg = compose(config_name=self.config_name, overrides=overrides)
            else:
                with initialize_config_dir(config_dir=self.config_dir, version_base="1.3"):
                    cfg = compose(config_name=self.config_name,
                                  overrides=self._search_path_override() + overrides)
        except (HydraException, OmegaConfBaseException) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError("overrides", f"{first_line} (overrides: {' '.join(trial_overrides)})") from None
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]

    def _search_path_override(self) -> list[str]:
        if not self.extra_search_paths or any(o.startswith("hydra.searchpath") for o in self.overrides):
            return []
        paths = ",".join(f"file://{p}" for p in self.extra_search_paths)
        return [f"hydra.searchpath=[{paths}]"]
