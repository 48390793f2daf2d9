"""`python -m embedder.evaluate ...`: evaluate an encoder (or BM25) on retrieval eval sets, without training.

The entry point only composes: the config (configs/eval.yaml), the key and value checks and one-line errors
(`embedder.cli.run_entry`), then `embedder.evaluation.run.run_evaluate`, where the work is (the shape of mine.py and
`embedder.mining.run`).
"""

from __future__ import annotations


def __getattr__(name: str):
    """`from embedder.evaluate import run_evaluate` keeps working, without importing the model stack before the
    command line's config is checked."""
    if name == "run_evaluate":
        from embedder.evaluation.run import run_evaluate

        return run_evaluate
    raise AttributeError(f"module 'embedder.evaluate' has no attribute {name!r}")

if __name__ == "__main__":
    from embedder.cli import run_entry

    run_entry("eval", "embedder.evaluation.run:run_evaluate")
