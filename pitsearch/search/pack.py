"""Which trials a worker trains together (`sweep.pack`): grid cells of one variant that differ only in a member
axis (`train.seed`, `train.lr`, `train.weight_decay`), trained as one stacked model by pitsearch.packed.

Each member stays its own Optuna trial, asked through the grid like any other (pitsearch.search.grid), so every
cell still runs once and resume and dead-worker recovery keep their guarantees; `run_trials` runs the pack.
`sweep.pack`: off (default on the CPU, where packing is slower: 3 members through vmap ran at 0.62x, measured),
auto (on CUDA: as many as fit in half the free memory, at most pitsearch.packed.AUTO_MAX_PACK; off elsewhere) or
N (at most N members, on any device: how CI tests the path).
"""

from __future__ import annotations

from typing import Any

from pitsearch.errors import ConfigError
from pitsearch.search.space import SEED_PATH
from pitsearch.search.trial import TrialRun, compose_trial, worker_dataset

MEMBER_AXES = (SEED_PATH, "train.lr", "train.weight_decay")   # pitsearch.packed.MEMBER_KEYS as config paths


def pack_capacity(trial, run: TrialRun) -> int:
    """How many trials may train in `trial`'s pack, itself included: 1 unless `sweep.pack` allows packing, the
    sweep is a grid and the trial's config can be packed (AdamW, no torch.compile)."""
    spec = run.spec
    if spec.pack == "off" or spec.sampler["name"] != "grid":
        return 1
    from pitsearch.packed import pack_key, pack_size
    from pitsearch.train import resolve_device

    try:
        values = spec.space.suggest(trial, seed_range=run.seed_range)
        cfg = compose_trial(run, values)
        device = resolve_device(cfg["train"].get("device"))
        if pack_key(cfg) is None or (spec.pack == "auto" and device.type != "cuda"):
            return 1
        model_cfg = _model_config(cfg, run)
    except ConfigError:
        return 1   # the trial fails on its own, with this error as its reason
    free = None
    if device.type == "cuda":   # the workers of one GPU share its memory
        import torch

        free = torch.cuda.mem_get_info(device)[0] // max(1, spec.trials_per_gpu)
    size = pack_size(model_cfg, cfg["train"], device, spec.pack, free_bytes=free)
    return min(size, run.pack_cap) if run.pack_cap is not None else size


def take_pack(study, run: TrialRun, first, capacity: int) -> list:
    """`first` and up to `capacity - 1` more trials whose grid cells equal its cell but for the member axes."""
    if capacity <= 1:
        return [first]
    import zlib

    from pitsearch.search.grid import next_grid_trial
    from pitsearch.search.rounds import opened_cells
    from pitsearch.search.trials import worker_id

    spec = run.spec
    fixed = study._storage.get_trial(first._trial_id).system_attrs.get("fixed_params", {})
    shared = _shared_part(spec.space.cell_key(fixed))
    pack = [first]
    while len(pack) < capacity:
        trial = next_grid_trial(study, spec.space, spec.sampler.get("seed"), spec.n_trials,
                                spec.output_dir / "grid.lock", offset=zlib.crc32(worker_id().encode()),
                                opened=opened_cells(spec), accept=lambda cell: _shared_part(cell) == shared)
        if trial is None:
            break
        pack.append(trial)
    return pack


def _shared_part(cell: frozenset) -> frozenset:
    return frozenset(item for item in cell if item[0] not in MEMBER_AXES)


def _model_config(cfg: dict[str, Any], run: TrialRun) -> dict[str, Any]:
    """The model config as a trial builds it (sizes filled from the data), for the memory estimate."""
    from pitsearch.experiment import fill_model_from_data
    from pitsearch.models import resolve_model_config

    return resolve_model_config(fill_model_from_data(cfg["model"], worker_dataset(cfg, run)))
