"""Plan a scoring run: check every record of a file before any model loads, and count the work.

What a scored record must hold (`query`, non-empty `answers`, candidates in `history` or `pos + neg`, a `task` with a
template) is the data contract's `embedder.data.records.check_scoring_record`. `query_id` is optional: the output is
aligned by line, so the line index stands in for it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.data.jsonl import parse_line
from embedder.data.records import candidate_list, check_scoring_record
from embedder.errors import DataError, no_records_error
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
    skipped: dict = field(default_factory=dict)  # skip_bad_records: {line: reason} of the bad records left out


def trim_record(record: dict[str, Any], max_candidates: int | None) -> tuple[dict[str, Any], bool]:
    """Cut the candidate list to `max_candidates` (a copy; the input record is left alone).

    pos + neg: positives are kept first, then the first negatives (with `neg_index` etc. trimmed alongside).
    history: the most recent turns are kept. Returns (record, whether anything was cut).
    """
    if max_candidates is None or len(candidate_list(record)) <= max_candidates:
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


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line; parsed only where needed."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, raw


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_file(path: str, templates: dict[str, Template], default_task: str | None, answer_choice: str,
              max_records: int | None = None, max_candidates: int | None = None, skip_bad: bool = False) -> FilePlan:
    """Validate every record that will be scored and count the work (no model, no tokenizer). `skip_bad`: a bad
    record (malformed, invalid, not UTF-8) is left out and counted in `plan.skipped` instead of stopping the run."""
    if answer_choice not in ANSWER_CHOICES:
        raise ValueError(f"answer_choice={answer_choice!r}; valid: {', '.join(ANSWER_CHOICES)}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1 (or null), got {max_candidates}")
    plan = FilePlan(path=path)
    for index, (line, raw) in enumerate(iter_raw_lines(path)):
        plan.total_records += 1
        if max_records is not None and index >= max_records:
            continue
        try:
            record = parse_line(raw, path, line)
            task = check_scoring_record(record, path, line, templates, default_task)
        except DataError as e:
            if not skip_bad:
                raise
            plan.records += 1  # the record keeps its place in the parts; it is neither scored nor written
            plan.skipped[line] = str(e).split(": ", 1)[-1].split("\n")[0]
            continue
        record, cut = trim_record(record, max_candidates)
        n = len(candidate_list(record))
        plan.records += 1
        plan.tasks[task] += 1
        plan.candidates += n
        plan.pairs += n * (len(record["answers"]) if answer_choice == "mean" else 1)
        plan.min_candidates = n if plan.min_candidates is None else min(plan.min_candidates, n)
        plan.max_candidates = n if plan.max_candidates is None else max(plan.max_candidates, n)
        plan.replaced_scores += "teacher_scores" in record
        plan.trimmed += cut
    if plan.total_records == 0 or len(plan.skipped) == plan.records:
        raise no_records_error(path, detail=f"{len(plan.skipped)} bad records skipped" if plan.skipped else "")
    plan.sha256 = file_sha256(path)
    return plan
