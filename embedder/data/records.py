"""Load and validate training files before any model work (one data contract, style convention 5)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.data.jsonl import iter_jsonl
from embedder.data.sampling import candidates, keep_record
from embedder.data.tasks import TaskSettings
from embedder.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class TrainFile:
    """One training file: its validated records (after the by-design filters) and what was dropped."""

    path: str
    name: str  # parent folder name (msmarco, nq, toolbench, ...), de-duplicated as name_1, name_2 like the reference
    task: str
    records: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)
    total: int = 0


def validate_record(record: dict[str, Any], path: str, line: int, settings: TaskSettings) -> None:
    """Raise DataError for a record the recipe cannot use (file, line and field named)."""
    query = record.get("query")
    if not isinstance(query, str):
        raise DataError("missing 'query'" if query is None else f"'query' must be a string, got {type(query).__name__}",
                        path=path, line=line, field="query", hint="every training record needs a query string")
    for key in ("pos", "neg", "history"):
        val = record.get(key)
        if val is not None and not (isinstance(val, list) and all(isinstance(x, str) for x in val)):
            raise DataError(f"'{key}' must be a list of strings", path=path, line=line, field=key)
    pos, neg = candidates(record)
    if not pos and not neg:
        what = "'history' is empty" if record.get("history") is not None else "'pos' and 'neg' are both empty"
        raise DataError(what, path=path, line=line, field="history" if record.get("history") is not None else "pos",
                        hint="give at least one positive or negative key (or delete the record)")
    scores = record.get("teacher_scores")
    if scores is not None:
        if not isinstance(scores, list) or not all(isinstance(x, (int, float)) for x in scores):
            raise DataError("'teacher_scores' must be a list of numbers", path=path, line=line, field="teacher_scores")
        aligned = "history" if record.get("history") is not None else "pos + neg"
        if len(scores) != len(pos) + len(neg):
            raise DataError(f"{len(scores)} teacher_scores for {len(pos) + len(neg)} keys in {aligned}",
                            path=path, line=line, field="teacher_scores",
                            hint=f"teacher_scores must align one-to-one with {aligned}; re-run score.py on this file")
    if settings.loss.distill_weight > 0 and not scores:
        raise DataError(
            f"task '{settings.name}' enables distillation (distill_weight={settings.loss.distill_weight}) "
            f"but this record has no teacher_scores", path=path, line=line, field="teacher_scores",
            hint=f"run score.py on this file to add teacher scores, or use a contrastive config: "
                 f"tasks.{settings.name}.loss.distill_weight=0 tasks.{settings.name}.loss.stable_distill=false "
                 f"tasks.{settings.name}.loss.contrastive_weight=1")
    if settings.sampling.select_positive == "random" and not pos:
        raise DataError("select_positive=random needs at least one positive", path=path, line=line, field="pos")


def load_train_file(path: str, tasks: dict[str, TaskSettings], default_task: str | None = None,
                    seed: int = 42, taken_names: Counter | None = None) -> TrainFile:
    """Read, validate and filter one training file. Records dropped by design are counted, never silent."""
    kept: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    task_name = None
    total = 0
    for line, record in iter_jsonl(path):
        total += 1
        name = record.get("task", default_task)
        if name is None:
            raise DataError("record has no 'task' and the file has no default task", path=path, line=line,
                            field="task", hint=f"add \"task\": one of {sorted(tasks)} to the records")
        if name not in tasks:
            raise DataError(f"unknown task {name!r}", path=path, line=line, field="task",
                            hint=f"valid tasks: {', '.join(sorted(tasks))}; add tasks.{name} in a task config to define it")
        if task_name is None:
            task_name = name
        elif name != task_name:
            raise DataError(f"task {name!r} differs from the file's first record ({task_name!r})", path=path,
                            line=line, field="task", hint="keep one task per training file")
        settings = tasks[name]
        validate_record(record, path, line, settings)
        reason = keep_record(record, settings.sampling)
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(record)
    if task_name is None:
        raise DataError("file has no records", path=path, hint="check that the file is non-empty JSON-lines")
    cap = tasks[task_name].sampling.max_sample_num
    if cap is not None and len(kept) > cap:
        # Seeded random subset; the reference keeps the *last* N rows (a quirk we do not copy).
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(kept), size=cap, replace=False))
        dropped["max_sample_num"] += len(kept) - cap
        kept = [kept[i] for i in idx]
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.basename(path)
    if taken_names is not None:
        n = taken_names[name]
        taken_names[name] += 1
        if n:
            name = f"{name}_{n}"
    return TrainFile(path=path, name=name, task=task_name, records=kept, dropped=dropped, total=total)


def report(files: list[TrainFile]) -> str:
    """One line per file: records kept and dropped by design (margin filter, no negatives, cap)."""
    lines = []
    for f in files:
        drops = ", ".join(f"{n} by {why}" for why, n in sorted(f.dropped.items())) or "none dropped"
        lines.append(f"  {f.name:<16} task={f.task:<10} kept {len(f.records)}/{f.total} ({drops})  {f.path}")
    return "\n".join(lines)
