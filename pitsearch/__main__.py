"""`python -m pitsearch [overrides]`: one training run; `python -m pitsearch +sweep=NAME`: an Optuna sweep.

Hydra composes the config from `conf/` (and `sweeps/` as the `sweep` group). Heavy modules (torch, timm,
mlflow) are imported only once a job starts, so `--help` and config errors are fast.

Every failure leaves through `pitsearch.cli.guarded`: one `error: <field or path>: <problem>` line, exit 2 (bad
input), 3 (lost server) or 130 (Ctrl-C), passwords masked; see pitsearch/cli.py.
"""

from __future__ import annotations

import os
import sys

from pitsearch.paths import CONF_DIR


def _job(cfg) -> None:
    from pitsearch.cli import guarded

    # Nothing may escape to Hydra: it would print "Error executing job with overrides: [...]", the command
    # line's passwords included, before its own traceback.
    status = guarded(_run_job, cfg)
    if status:
        raise SystemExit(status)


def _run_job(cfg) -> int:
    from pitsearch.cli import EXIT_INTERRUPTED

    _mask_hydra_record()   # first: whatever happens next, Hydra's record holds no password
    tracking = cfg.get("tracking") or {}
    if tracking.get("enabled", True) and tracking.get("uri"):
        from pitsearch.tracking import check_tracking_uri

        check_tracking_uri(tracking.get("uri"))   # light: one line before torch is even imported
    if cfg.get("sweep") is not None:
        from pitsearch.report.sweep import StudyReporter
        from pitsearch.search.runner import run_sweep

        # A Ctrl-C'd sweep cleans up and prints its own "interrupted" line, then returns.
        return EXIT_INTERRUPTED if run_sweep(cfg, reporter=StudyReporter()).get("interrupted") else 0
    from pitsearch.experiment import run_single

    run_single(cfg)
    return 0


def _mask_hydra_record() -> None:
    """Hydra saved the command line (`tracking.uri=http://user:password@...`, `sweep.storage=...`) and the
    composed config under the run's output dir (and, with -m, `multirun.yaml`) before the job started: mask
    the passwords there, for single runs and sweeps alike."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pitsearch.masking import mask_url

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    records = []
    if hydra_cfg.output_subdir:
        records += (Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir).glob("*.yaml")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        records.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    for path in records:
        if path.is_file():
            text = path.read_text()
            if mask_url(text) != text:
                path.write_text(mask_url(text))


def _mask_log_records() -> None:
    """Hydra's launcher logs every job's overrides (`#0 : tracking.uri=http://user:password@...`) before any job
    starts, and libraries log URLs: each log record is masked as it is made, whatever handler prints it."""
    import logging

    from pitsearch.masking import mask_url

    make_record = logging.getLogRecordFactory()

    def masked_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if mask_url(message) != message:
            record.msg, record.args = mask_url(message), ()
        return record

    logging.setLogRecordFactory(masked_record)


def _hydra_main() -> None:
    import hydra

    _mask_log_records()

    # Hydra reports its own errors (an unknown option, a typo'd key, a sweep file that does not parse, a run
    # folder it cannot make) as several lines and exit 1, inside hydra.main. HYDRA_FULL_ERROR (Hydra's own,
    # documented switch) makes it raise them instead, so `guarded` turns them into one line and exit 2.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_job)()
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def main() -> None:
    from pitsearch.cli import guarded

    sys.exit(guarded(_hydra_main))


if __name__ == "__main__":
    main()
