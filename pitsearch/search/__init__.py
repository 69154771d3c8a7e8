"""Sweep search: the `sweep.space` grammar and the Optuna parts (sampler, pruner, storage, study, budget)."""

from pitsearch.search.space import SEED_PATH, SearchSpace, hydra_value, parse_space
from pitsearch.search.storage import journal_path, make_storage, mask_url
from pitsearch.search.study import PRUNERS, SAMPLERS, load_or_create_study, make_pruner, make_sampler, parse_objectives
from pitsearch.search.trials import (
    RetryStaleTrialCallback,
    count_finished,
    count_running,
    done_grid_cells,
    fail_stale_running,
    mark_worker,
    requeue_failed,
    tell,
    worker_id,
)

__all__ = [
    "PRUNERS", "RetryStaleTrialCallback", "SAMPLERS", "SEED_PATH", "SearchSpace", "count_finished", "count_running",
    "done_grid_cells", "fail_stale_running", "hydra_value", "journal_path", "load_or_create_study",
    "make_pruner", "make_sampler", "make_storage", "mark_worker", "mask_url", "parse_objectives",
    "parse_space", "requeue_failed", "tell", "worker_id",
]
