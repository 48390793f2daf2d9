"""Training files: validated in one streamed pass, then read lazily by byte offset.

`load_train_file` checks every record against the data contract (`records.check_train_record`) before any model
work and keeps only the byte offsets of the records it keeps (8 bytes each), so memory does not grow with the file.
The result is cached by `index_cache`, so a rerun, a resumed run or another rank of the job reuses it.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from embedder.data.index_cache import cached_index, file_identity
from embedder.data.jsonl import JsonlRecords, iter_jsonl_offsets
from embedder.data.kinds import RecordKind
from embedder.data.records import check_train_record, record_task
from embedder.data.sampling import keep_record
from embedder.errors import DataError, no_records_error

log = logging.getLogger(__name__)


@dataclass
class TrainFile:
    """One training file: its kept records (read on access) and what was dropped by design."""

    path: str
    name: str  # parent folder name (msmarco, nq, toolbench, ...), de-duplicated as name_1, name_2 like the reference
    task: str
    records: JsonlRecords
    dropped: Counter = field(default_factory=Counter)
    total: int = 0


def _settings_key(tasks: dict[str, RecordKind]) -> dict[str, Any]:
    """Everything in the task settings that decides which records pass and are kept."""
    return {name: {"sampling": asdict(t.sampling), "needs_teacher_scores": t.needs_teacher_scores}
            for name, t in sorted(tasks.items())}


def _scan(path: str, tasks: dict[str, RecordKind], default_task: str | None,
          seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Validate every record of `path` (streamed); the kept records' offsets and the counts."""
    kept = array("q")
    dropped: Counter = Counter()
    task_name = None
    total = 0
    for line, offset, record in iter_jsonl_offsets(path, progress=f"validating {os.path.basename(path)}"):
        total += 1
        name = record_task(record, default_task, path, line, valid=tasks,
                           hint_default=f"add \"task\": one of {sorted(tasks)} to the records, or set "
                           f"default_record_kind=<one of them>")
        if task_name is None:
            task_name = name
        elif name != task_name:
            raise DataError(f"task {name!r} differs from the file's first record ({task_name!r})", path=path,
                            line=line, field="task", hint="keep one task per training file")
        settings = tasks[name]
        check_train_record(record, path, line, settings)
        reason = keep_record(record, settings.sampling)
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(offset)
    if task_name is None:
        raise no_records_error(path)
    offsets = np.frombuffer(kept, dtype=np.int64) if len(kept) else np.zeros(0, np.int64)
    cap = tasks[task_name].sampling.max_sample_num
    if cap is not None and len(offsets) > cap:
        # Seeded random subset; the reference keeps the *last* N rows (a quirk we do not copy).
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(offsets), size=cap, replace=False))
        dropped["max_sample_num"] += len(offsets) - cap
        offsets = offsets[idx]
    return {"offsets": offsets}, {"task": task_name, "total": total, "dropped": dict(dropped)}


def load_train_file(path: str, tasks: dict[str, RecordKind], default_task: str | None = None,
                    seed: int = 42, taken_names: Counter | None = None, use_cache: bool = True) -> TrainFile:
    """Validate one training file (or reuse its cached index) and return it with lazily read records.

    Records dropped by design (margin filter, no negatives, `max_sample_num`) are counted, never silent.
    """
    key = {"file": file_identity(path), "tasks": _settings_key(tasks), "default_task": default_task, "seed": seed}
    arrays, meta = cached_index("train", key, lambda: _scan(path, tasks, default_task, seed), use_cache=use_cache)
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.basename(path)
    if taken_names is not None:
        n = taken_names[name]
        taken_names[name] += 1
        if n:
            name = f"{name}_{n}"
    return TrainFile(path=path, name=name, task=meta["task"], records=JsonlRecords(path, arrays["offsets"]),
                     dropped=Counter(meta["dropped"]), total=int(meta["total"]))


def report(files: list[TrainFile]) -> str:
    """One line per file: records kept and dropped by design (margin filter, no negatives, cap)."""
    lines = []
    for f in files:
        drops = ", ".join(f"{n} by {why}" for why, n in sorted(f.dropped.items())) or "none dropped"
        lines.append(f"  {f.name:<16} task={f.task:<10} kept {len(f.records)}/{f.total} ({drops})  {f.path}")
    return "\n".join(lines)
