"""pitsearch's config schema (one dataclass per Hydra config group) and the checks against it."""

from pitsearch.config.check import check_config, checked, plain
from pitsearch.config.schema import register

__all__ = ["check_config", "checked", "plain", "register"]
