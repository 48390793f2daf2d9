"""Per-task settings: instructions, sampling and loss, as read from `configs/task/*.yaml`.

A record's `task` field (qa, convsearch, chat, lrlm, icl, tool, or any name a config adds) selects its
`TaskSettings`. This replaces the reference's in-code `TASK_CONFIG` dict and its per-batch `_refresh_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embedder.data.sampling import SamplingConfig
from embedder.losses.combine import LossWeights


@dataclass(frozen=True)
class Instruction:
    query: str = ""  # prepended to every query of the task
    key: str = ""  # prepended to every key (positives, negatives, corpus rows)


@dataclass(frozen=True)
class TaskSettings:
    name: str
    instruction: Instruction = field(default_factory=Instruction)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossWeights = field(default_factory=LossWeights)


def build_task_settings(tasks: Mapping[str, Any], group_size: int, version: Mapping[str, Any] | None = None,
                        add_instruction: bool = True) -> dict[str, TaskSettings]:
    """Turn the `record_kinds:` config mapping into frozen settings.

    `version` is the instruction table chosen by `version=` (bge, e5, instructor, none, llm-embedder). It maps a
    task name (or `default`) to `{query, key}`; a task it does not name keeps the instruction of its task config
    (the llm-embedder strings).
    """
    version = dict(version or {})
    out: dict[str, TaskSettings] = {}
    for name, spec in tasks.items():
        spec = dict(spec or {})
        inst = version.get(name, version.get("default", spec.get("instruction") or {}))
        inst = dict(inst or {})
        instruction = Instruction(query=inst.get("query") or "", key=inst.get("key") or "")
        if not add_instruction:
            instruction = Instruction()
        s = dict(spec.get("sampling") or {})
        sampling = SamplingConfig(
            select_positive=s.get("select_positive", "first"),
            select_negative=s.get("select_negative", "random"),
            group_size=int(s.get("group_size") or group_size),
            teacher_scores_margin=s.get("teacher_scores_margin"),
            teacher_scores_min=s.get("teacher_scores_min"),
            max_sample_num=s.get("max_sample_num"),
            stable_distill=bool((spec.get("loss") or {}).get("stable_distill", False)),
        )
        l_ = dict(spec.get("loss") or {})
        loss = LossWeights(
            contrastive_weight=float(l_.get("contrastive_weight", 0.2)),
            distill_weight=float(l_.get("distill_weight", 1.0)),
            teacher_temperature=float(l_.get("teacher_temperature", 1.0)),
            student_temperature=float(l_.get("student_temperature", 1.0)),
            stable_distill=bool(l_.get("stable_distill", False)),
        )
        unknown = set(spec) - {"instruction", "sampling", "loss"}
        if unknown:
            raise ValueError(f"record_kinds.{name}: unknown keys {sorted(unknown)}; valid: instruction, sampling, loss")
        out[name] = TaskSettings(name=name, instruction=instruction, sampling=sampling, loss=loss)
    return out


def export_prompts(tasks: dict[str, TaskSettings], default: str | None = None) -> dict[str, str]:
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
