"""Sweep search: the `sweep.space` grammar and the Optuna parts (sampler, pruner, storage, study, grid cells,
adaptive rounds), one trial (`trial`), the worker loop (`worker`) and the command's order (`runner`).

Nothing is imported here: `import pitsearch.search.space` must not load optuna's samplers, torch or mlflow.
`search` never imports `pitsearch.report` (the report reads studies; a sweep is handed a reporter).
"""
