"""LM teacher scores for the distillation losses: log p(answer | key, query) under a causal LM.

- `templates.py`: per-task prompts from config, rendered with exact character spans.
- `records.py`: what a record needs to be scored, validated for whole files before any model loads.
- `lm_scorer.py`: `LMScorer`, tokenisation with key/context truncation, length-sorted batches, masked log-likelihood.
- `run.py`: `run_score(cfg)`, the body of `score.py` (parts, shards, resume, atomic output, meta sidecar).
- `tiny_lm.py`: a tiny random Llama + tokenizer for tests.

Importing this package does not import torch or transformers.
"""
