"""MTEB retrieval tasks through `python -m embedder.evaluate mteb_tasks=[SciFact,NFCorpus]` (the `[mteb]` extra).

The encoder goes to MTEB as a sentence-transformers model with its prompts: an embedder export already carries
`query`/`document` prompts (the trained instructions); any other model gets the run's instructions (the `version`
table for `instruction_kind`) as those two prompts. MTEB's own wrapper picks `query`/`document` by prompt type, so queries
and documents are encoded as they were in training. Results are cached by MTEB under `output_dir/mteb`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)


def import_mteb():
    try:
        import mteb
    except ImportError as e:
        raise ImportError("mteb_tasks needs the mteb package: pip install 'embedder[mteb]'") from e
    return mteb


def sentence_transformer(path: str, query_instruction: str = "", key_instruction: str = "", device: str | None = None):
    """A SentenceTransformer for `path`, with `query`/`document` prompts: the model's own, else the instructions."""
    from sentence_transformers import SentenceTransformer

    from embedder.errors import ModelLoadErrors

    with ModelLoadErrors(path):
        model = SentenceTransformer(path, device=device)
    prompts = dict(model.prompts or {})
    if "query" not in prompts and (query_instruction or key_instruction):
        prompts.update(query=query_instruction, document=key_instruction)
        model.prompts = prompts
    log.info("MTEB model %s with prompts %s", path, {k: prompts[k] for k in ("query", "document") if k in prompts})
    return model


def run_mteb(model: Any, tasks: list[Any], output_dir: str, batch_size: int = 64) -> dict[str, float]:
    """Evaluate `model` on MTEB task objects; returns `{"mteb/<task>/<split>/<metric>": value}` for every score of
    every split (the main score also as `mteb/<task>/main_score`)."""
    mteb = import_mteb()
    from mteb.cache import ResultCache

    cache = ResultCache(cache_path=os.path.join(output_dir, "mteb"))
    result = mteb.evaluate(model, tasks, cache=cache, encode_kwargs={"batch_size": batch_size},
                           show_progress_bar=False)
    out: dict[str, float] = {}
    for task_result in result.task_results:
        name = task_result.task_name
        main = None
        for split, per_subset in task_result.scores.items():
            for scores in per_subset:
                for key, value in scores.items():
                    # finite numbers only: MTEB's diagnostic nAUC scores are NaN on tiny sets
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                        out[f"mteb/{name}/{split}/{key}"] = float(value)
                main = scores.get("main_score", main)
        if main is not None:
            out[f"mteb/{name}/main_score"] = float(main)
    return out


def tasks_by_name(names: list[str]) -> list[Any]:
    """MTEB task objects for the given names (only retrieval-type tasks make sense for a retriever)."""
    mteb = import_mteb()
    tasks = list(mteb.get_tasks(tasks=list(names)))
    found = {t.metadata.name for t in tasks}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"unknown MTEB tasks {missing}; see mteb.get_tasks(task_types=['Retrieval'])")
    return tasks
