"""LM teacher scores for the distillation losses: log p(answer | key, query) under a causal LM.

- `templates.py`: per-task prompts from config, rendered with exact character spans.
- `records.py`: what a record needs to be scored, validated for whole files before any model loads.
- `lm_scorer.py`: `LMScorer`, tokenisation with key/context truncation, length-sorted batches, masked log-likelihood.
- `settings.py`: `ScoreSettings`, the one place the scoring defaults live.
- `parts.py`: the part cache (fingerprint, atomic parts, merge in input order, meta sidecar).
- `run.py`: `run_score(cfg)`, the body of `score.py` (shards, devices, torchrun, dry run, summary).
- `tiny_lm.py`: a tiny random Llama + tokenizer for tests.

Must not import training, retrieval, evaluation or mining.

Importing this package does not import torch or transformers.
"""
