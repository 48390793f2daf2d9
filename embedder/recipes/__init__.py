"""Recipes: preparation stages a task config lists under `prepare:`, run by `run_train` before training, in order.

A stage is a callable `cfg -> cfg` named by `_target_` (with `_partial_: true`): it prepares what training needs
(split a dataset, mine negatives, score candidates; each step cached and written atomically), and returns the config
with the prepared files filled in (`train_data`, `eval`). Rank-0-only work goes through
`embedder.distributed.prepare_once`, so every rank of a torchrun/SLURM job sees the same prepared files.

- `beir.prepare`: a BEIR folder -> split, mined (and teacher-scored) train file, dev/test eval sets (task=beir).

May import: data, mining, scoring, config, and the foundation modules; never training or lit_module.
"""
