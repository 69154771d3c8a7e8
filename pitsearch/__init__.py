"""pitsearch: Hydra + Optuna + MLflow sweeps of pooling vision transformers.

Importing the package stores the config schema in Hydra's ConfigStore (pitsearch.config.schema), so every process
that composes pitsearch's configs (the CLI, a sweep's workers, tests) composes them typed.
"""

from pitsearch.config.schema import register as _register_schema

_register_schema()
