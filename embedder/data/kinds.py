"""Per-record-kind settings: instructions, sampling and losses, as `embedder.record_kinds` builds them from
`record_kinds:` in configs/task/*.yaml.

A record's `task` field (qa, convsearch, chat, lrlm, icl, tool, or any name a config adds) selects its
`RecordKind`. This replaces the reference's in-code `TASK_CONFIG` dict and its per-batch `_refresh_config`.
The data layer reads a kind's losses only through `needs_teacher_scores` (and the sampling's
`stable_distill`); the losses themselves are built by the training module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embedder.data.sampling import SamplingConfig


@dataclass(frozen=True)
class Instruction:
    query: str = ""  # prepended to every query of the task
    key: str = ""  # prepended to every key (positives, negatives, corpus rows)


@dataclass(frozen=True)
class LossSpec:
    """One loss a record kind trains with: the class (`_target_`), its weight and its own arguments."""
    target: str  # e.g. embedder.losses.InfoNCELoss
    weight: float = 1.0  # its weight (see embedder.losses.combine for the combination rule)
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # the class's own arguments (teacher_temperature, ...)


@dataclass(frozen=True)
class RecordKind:
    name: str
    instruction: Instruction = field(default_factory=Instruction)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    losses: tuple[LossSpec, ...] = (LossSpec("embedder.losses.InfoNCELoss"),)
    needs_teacher_scores: bool = False  # a listed loss uses teacher scores: every record must carry them


def export_prompts(tasks: dict[str, RecordKind], default: str | None = None) -> dict[str, str]:
    """sentence-transformers prompts from the task instructions: `<task>_query` and `<task>_key` for every task, and
    `query`/`document` (what `encode_query`/`encode_document` and MTEB use) from the `default` task: the only one,
    or the named one (`export_record_kind`; qa in the LLM-Embedder recipe)."""
    prompts: dict[str, str] = {}
    for name, t in tasks.items():
        prompts[f"{name}_query"] = t.instruction.query
        prompts[f"{name}_key"] = t.instruction.key
    if default is None and len(tasks) == 1:
        default = next(iter(tasks))
    if default is not None:
        if default not in tasks:
            raise ValueError(f"export_record_kind={default!r} is not one of this run's tasks: {', '.join(sorted(tasks))}")
        prompts["query"], prompts["document"] = tasks[default].instruction.query, tasks[default].instruction.key
    return prompts


TaskSettings = RecordKind  # the old name, kept for one release (0.2 -> 0.3)
