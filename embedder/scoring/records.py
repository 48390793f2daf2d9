"""What a record must hold to be scored, checked for a whole file before any model loads.

A scored record needs `query` (string), `answers` (non-empty list of strings), candidates (`history` for chat,
otherwise `pos + neg`, at least one) and a `task` with a template (from the record or the `task` setting).
`query_id` is optional: the output is aligned by line, so the line index stands in for it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.data.jsonl import iter_jsonl
from embedder.errors import DataError
from embedder.scoring.templates import Template

ANSWER_CHOICES = ("seeded", "first", "mean")
PARALLEL_NEG_FIELDS = ("neg_index", "neg_score", "neg_scores")  # lists aligned with `neg`, trimmed together with it


@dataclass
class FilePlan:
    """The validated outline of one input file: what will be scored, counted before the model loads."""

    path: str
    records: int = 0            # records to score (after max_records)
    total_records: int = 0      # records in the file
    pairs: int = 0              # (record, candidate, answer) LM inputs
    candidates: int = 0         # teacher scores to write
    tasks: Counter = field(default_factory=Counter)
    min_candidates: int | None = None
    max_candidates: int | None = None
    replaced_scores: int = 0    # records that already had teacher_scores (they are replaced)
    trimmed: int = 0            # records whose candidate list max_candidates cut
    sha256: str = ""


def candidate_field(record: dict[str, Any]) -> str:
    return "history" if record.get("history") is not None else "pos + neg"


def candidates(record: dict[str, Any]) -> list[str]:
    """The keys to score, in the order `teacher_scores` follows: `history`, or `pos + neg`."""
    if record.get("history") is not None:
        return list(record["history"])
    return list(record.get("pos") or []) + list(record.get("neg") or [])


def trim_record(record: dict[str, Any], max_candidates: int | None) -> tuple[dict[str, Any], bool]:
    """Cut the candidate list to `max_candidates` (a copy; the input record is left alone).

    pos + neg: positives are kept first, then the first negatives (with `neg_index` etc. trimmed alongside).
    history: the most recent turns are kept. Returns (record, whether anything was cut).
    """
    if max_candidates is None or len(candidates(record)) <= max_candidates:
        return record, False
    out = dict(record)
    if record.get("history") is not None:
        out["history"] = list(record["history"])[-max_candidates:]
        return out, True
    pos = list(record.get("pos") or [])[:max_candidates]
    n_neg = max_candidates - len(pos)
    neg_len = len(record.get("neg") or [])
    if "pos" in out:
        out["pos"] = pos
        if isinstance(record.get("pos_index"), list) and len(record["pos_index"]) == len(record["pos"]):
            out["pos_index"] = record["pos_index"][:max_candidates]
    out["neg"] = list(record.get("neg") or [])[:n_neg]
    for name in PARALLEL_NEG_FIELDS:
        if isinstance(record.get(name), list) and len(record[name]) == neg_len:
            out[name] = record[name][:n_neg]
    return out, True


def choose_answers(answers: list[str], mode: str, seed: int, index: int) -> list[str]:
    """The answer(s) to score for record number `index`: one seeded draw, the first, or all (averaged later)."""
    if mode == "mean" or len(answers) == 1:
        return list(answers) if mode == "mean" else [answers[0]]
    if mode == "first":
        return [answers[0]]
    if mode == "seeded":
        # Seeded by (seed, record index), so the draw does not depend on sharding or batch order.
        rng = np.random.default_rng([seed, index])
        return [answers[int(rng.integers(len(answers)))]]
    raise ValueError(f"answer_choice={mode!r}; valid: {', '.join(ANSWER_CHOICES)}")


def record_task(record: dict[str, Any], default_task: str | None, path: str, line: int) -> str:
    task = record.get("task", default_task)
    if task is None:
        raise DataError("record has no 'task', and no default is set", path=path, line=line, field="task",
                        hint="add \"task\" to the records, or pass default_task=<qa|convsearch|icl|chat|lrlm> to score.py")
    if not isinstance(task, str):
        raise DataError(f"'task' must be a string, got {type(task).__name__}", path=path, line=line, field="task")
    return task


def validate_record(record: dict[str, Any], path: str, line: int, templates: dict[str, Template],
                    default_task: str | None) -> str:
    """Raise DataError (file, line, field) for a record that cannot be scored; return its task."""
    task = record_task(record, default_task, path, line)
    template = templates.get(task)
    if template is None:
        raise DataError(f"task {task!r} has no LM-scoring template", path=path, line=line, field="task",
                        hint=f"templates exist for: {', '.join(sorted(templates)) or 'none'}. Add one in config, e.g. "
                             f"'+templates.{task}.text=\"{{key}}\\n{{query}}\\n{{answer}}\"' or a file under "
                             f"configs/templates/, or leave this task out of the files you score")
    query = record.get("query")
    if not isinstance(query, str):
        raise DataError("missing 'query'" if query is None else f"'query' must be a string, got {type(query).__name__}",
                        path=path, line=line, field="query", hint="every scored record needs a query string")
    answers = record.get("answers")
    if answers is None:
        raise DataError("missing 'answers' (the output whose likelihood the LM scores)", path=path, line=line,
                        field="answers", hint="add \"answers\": [\"...\"]; LM scoring computes log p(answer | key, query)")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError("'answers' must be a non-empty list of strings", path=path, line=line, field="answers")
    if not all(a.strip() for a in answers):
        raise DataError("'answers' holds an empty answer", path=path, line=line, field="answers",
                        hint="an empty output has no tokens to score; drop it or the record")
    names = ("history",) if record.get("history") is not None else ("pos", "neg")
    for name in names:
        val = record.get(name)
        if val is not None and not (isinstance(val, list) and all(isinstance(x, str) for x in val)):
            raise DataError(f"'{name}' must be a list of strings", path=path, line=line, field=name)
    if not candidates(record):
        what = candidate_field(record)
        raise DataError(f"no candidates to score: '{what}' is empty", path=path, line=line,
                        field="history" if what == "history" else "pos",
                        hint="give at least one key to score (pos/neg, or history for chat), or delete the record")
    missing = template.missing_fields(record)
    if missing:
        raise DataError(f"the {task!r} template reads {{{missing[0]}}} but the record has no such string field",
                        path=path, line=line, field=missing[0],
                        hint=f"add the field, or give it a default: templates.{task}.defaults.{missing[0]}=''")
    return task


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_file(path: str, templates: dict[str, Template], default_task: str | None, answer_choice: str,
              max_records: int | None = None, max_candidates: int | None = None) -> FilePlan:
    """Validate every record that will be scored and count the work (no model, no tokenizer)."""
    if answer_choice not in ANSWER_CHOICES:
        raise ValueError(f"answer_choice={answer_choice!r}; valid: {', '.join(ANSWER_CHOICES)}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1 (or null), got {max_candidates}")
    plan = FilePlan(path=path)
    for index, (line, record) in enumerate(iter_jsonl(path)):
        plan.total_records += 1
        if max_records is not None and index >= max_records:
            continue
        task = validate_record(record, path, line, templates, default_task)
        record, cut = trim_record(record, max_candidates)
        n = len(candidates(record))
        plan.records += 1
        plan.tasks[task] += 1
        plan.candidates += n
        plan.pairs += n * (len(record["answers"]) if answer_choice == "mean" else 1)
        plan.min_candidates = n if plan.min_candidates is None else min(plan.min_candidates, n)
        plan.max_candidates = n if plan.max_candidates is None else max(plan.max_candidates, n)
        plan.replaced_scores += "teacher_scores" in record
        plan.trimmed += cut
    if plan.total_records == 0:
        raise DataError("file has no records", path=path, hint="check that the file is non-empty JSON-lines")
    plan.sha256 = file_sha256(path)
    return plan
