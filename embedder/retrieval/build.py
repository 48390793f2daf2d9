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
    """The retriever `cfg.retriever` names by `_target_` (configs/retriever/*.yaml): its factory is called with
    `work_dir` and the YAML's own keys, and, for a retriever that `uses_model`, with the run's config, the encoder
    (loaded from `model` when not given), the predict trainer and the instructions. A new retriever is its module
    and its YAML."""
    from hydra.utils import instantiate

    spec = OmegaConf.to_container(cfg.retriever, resolve=True)
    spec.pop("name", None)
    uses_model = bool(spec.pop("uses_model", False))
    extra: dict[str, Any] = {"work_dir": work_dir}
    if uses_model:
        extra.update(run_cfg=cfg, encoder=encoder, trainer=trainer, query_instruction=query_instruction,
                     key_instruction=key_instruction)
    return instantiate(spec, _convert_="all")(**extra)
