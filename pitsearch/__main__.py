"""`python -m pitsearch [overrides]`: one training run; `python -m pitsearch +sweep=NAME`: an Optuna sweep.

Hydra composes the config from `conf/` (and `sweeps/` as the `sweep` group). Heavy modules (torch, timm,
mlflow) are imported only once a job starts, so `--help` and config errors are fast.
"""

from __future__ import annotations

import sys

from pitsearch.paths import CONF_DIR


def _job(cfg) -> None:
    from pitsearch.errors import ConfigError

    try:
        if cfg.get("sweep") is not None:
            from pitsearch.search.runner import run_sweep

            run_sweep(cfg)
        else:
            from pitsearch.experiment import run_single

            run_single(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_job)()


if __name__ == "__main__":
    main()
