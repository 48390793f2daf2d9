"""Build the retriever a config names (`retriever=dense|bm25`) and the instructions it encodes with.

Shared by mining (`mine.py`) and standalone evaluation (`python -m embedder.evaluate`), so both retrieve with the same
code and settings.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from embedder.retrieval.base import Retriever

log = logging.getLogger(__name__)



def resolve_instruction(cfg: DictConfig, task: str | None) -> tuple[str, str]:
    """`(query instruction, key instruction)` for `task`.

    Order: an explicit `instruction.query/key` in the config; the `version` table's entry for the task, then its
    `default`; the task config's `record_kinds.<kind>.instruction` (llm-embedder version); else none, with a warning.
    `version.add_instruction=false` (version=none) means none.
    """
    explicit = cfg.get("instruction") or {}
    if explicit.get("query") is not None or explicit.get("key") is not None:
        return explicit.get("query") or "", explicit.get("key") or ""
    version = cfg.get("version") or {}
    if not version.get("add_instruction", False):
        return "", ""
    table = version.get("table") or {}
    inst = table.get(task) if task else None
    inst = inst or table.get("default")
    if inst is None and task and (cfg.get("record_kinds") or {}).get(task) is not None:
        inst = cfg.record_kinds[task].get("instruction")
    if inst is None:
        log.warning("version=%s has no instruction for task %r and no record_kinds.%s config is loaded: encoding without "
                    "instructions (set instruction.query/key, or add task=<config> for the llm-embedder ones)",
                    version.get("name"), task, task)
        return "", ""
    return inst.get("query") or "", inst.get("key") or ""


def build_retriever(cfg: DictConfig, work_dir: str, query_instruction: str = "", key_instruction: str = "",
                    encoder: Any = None, trainer: Any = None) -> Retriever:
    """The retriever chosen by `cfg.retriever.name` (`dense` loads the encoder now, `bm25` picks a backend)."""
    rcfg = cfg.retriever
    if rcfg.name == "bm25":
        from embedder.retrieval.bm25 import make_bm25

        return make_bm25(work_dir, backend=rcfg.backend, k1=rcfg.k1, b=rcfg.b, threads=rcfg.threads,
                         java_home=rcfg.get("java_home"), language=rcfg.get("language", "en"),
                         save_index=bool(rcfg.get("save_index", True)))
    if rcfg.name != "dense":
        raise ValueError(f"retriever={rcfg.name!r}; valid: dense, bm25")
    from embedder.retrieval.dense import DenseRetriever
    from embedder.retrieval.encode import make_predict_trainer
    from embedder.retrieval.encode.model import load_encoder

    encoder = encoder if encoder is not None else load_encoder(cfg.model, cfg.get("model_path"))
    icfg = cfg.index
    return DenseRetriever(
        encoder, work_dir, trainer=trainer or make_predict_trainer(cfg.get("trainer")),
        query_instruction=query_instruction, key_instruction=key_instruction,
        query_max_length=cfg.query_max_length, key_max_length=cfg.key_max_length,
        batch_size=rcfg.batch_size, shard_size=rcfg.shard_size, index_factory=icfg.factory, metric=icfg.similarity,
        use_gpu=icfg.use_gpu, search_params=OmegaConf.to_container(icfg.search_params) if icfg.search_params else None,
        train_sample=icfg.train_sample, save_index=icfg.save, dtype=rcfg.dtype, search_batch=rcfg.search_batch,
        num_workers=rcfg.get("num_workers", 0), batch_tokens=rcfg.get("batch_tokens", 0),
        token_cache=rcfg.get("token_cache", True))
