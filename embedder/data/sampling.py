"""Build one training group (query, 1 positive, G-1 negatives, teacher scores) from one record.

This is the reference's `get_train_process_fn` (reference §2.2) with two deliberate changes:
- it runs lazily in `__getitem__` with a generator seeded by (seed, epoch, record), so negatives are re-drawn
  every epoch and every run is reproducible (the reference samples once, unseeded, in 32 processes);
- the stable-distillation sort is a separate, explicit step (`sort_negatives_by_teacher`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedder.data.records import candidates

SELECT_POSITIVE = ("first", "random", "teacher", "teacher-pos")
SELECT_NEGATIVE = ("random", "first", "teacher-", "teacher+")


@dataclass(frozen=True)
class SamplingConfig:
    """Per-task sampling settings (reference `TASK_CONFIG["llm-embedder"]["training"]`)."""

    select_positive: str = "first"
    select_negative: str = "random"
    group_size: int = 8
    teacher_scores_margin: float | None = None
    teacher_scores_min: float | None = None
    max_sample_num: int | None = None
    stable_distill: bool = False

    def __post_init__(self):
        if self.select_positive not in SELECT_POSITIVE:
            raise ValueError(f"select_positive={self.select_positive!r}; valid: {', '.join(SELECT_POSITIVE)}")
        if self.select_negative not in SELECT_NEGATIVE:
            raise ValueError(f"select_negative={self.select_negative!r}; valid: {', '.join(SELECT_NEGATIVE)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


def keep_record(record: dict[str, Any], cfg: SamplingConfig) -> str | None:
    """Return None to keep a record, or the reason it is dropped by design (counted and reported at start)."""
    pos, neg = candidates(record)
    scores = record.get("teacher_scores")
    if scores is not None and len(scores) > 0:
        if cfg.teacher_scores_min is not None and max(scores) < cfg.teacher_scores_min:
            return "teacher_scores_min"
        if cfg.teacher_scores_margin is not None and max(scores) - min(scores) < cfg.teacher_scores_margin:
            return "teacher_scores_margin"
    if cfg.group_size > 1:
        # A negative is needed unless the positive itself is promoted from the negatives by `teacher`,
        # which leaves at least one behind only when there are two or more candidates.
        n_neg = len(neg)
        if not pos and cfg.select_positive == "teacher" and scores:
            n_neg -= 1
        if n_neg <= 0:
            return "no negatives"
    if not pos and not (cfg.select_positive == "teacher" and scores):
        return "no positive"
    return None


def sample_group(record: dict[str, Any], cfg: SamplingConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one group from a record that `keep_record` accepted.

    Returns {"query": str, "keys": [pos, neg_1..neg_{G-1}], "teacher_scores": [G floats] or None,
    "positives": the record's labelled positives (`loss.mask_known_positives` leaves them out of its negatives)}.
    """
    pos, neg = candidates(record)
    scores = record.get("teacher_scores")
    scores = list(map(float, scores)) if scores is not None and len(scores) > 0 else None
    G = cfg.group_size

    # select_positive (reference §2.2 step 3); `teacher` without scores falls back to `first`, as in the reference
    mode = cfg.select_positive
    if mode in ("teacher", "teacher-pos") and scores is None:
        mode = "first"
    if mode == "random":
        idx = int(rng.integers(len(pos)))
    elif mode == "teacher":
        idx = int(np.argmax(scores))  # over ALL candidates: a negative can be promoted to positive
    elif mode == "teacher-pos":
        idx = int(np.argmax(scores[: len(pos)]))
    else:
        idx = 0
    if idx < len(pos):
        positive = pos[idx]
        pos_score = scores[idx] if scores is not None else None
        neg_scores = scores[len(pos):] if scores is not None else None
    else:  # promote negative idx-len(pos); unused positives are dropped, not turned into negatives
        j = idx - len(pos)
        positive = neg[j]
        neg = neg[:j] + neg[j + 1:]
        pos_score = scores[idx]
        neg_scores = scores[len(pos): idx] + scores[idx + 1:]

    keys = [positive]
    group_scores = [pos_score] if scores is not None else None
    if G > 1:
        # pad a short negative pool by repetition (reference step 5); scores repeat the same way
        if len(neg) < G - 1:
            times = math.ceil((G - 1) / len(neg))
            neg = neg * times
            neg_scores = neg_scores * times if neg_scores is not None else None
        sel = cfg.select_negative
        if sel in ("teacher-", "teacher+") and neg_scores is None:
            sel = "random"
        if sel == "teacher-":
            chosen = np.argsort(np.asarray(neg_scores), kind="stable")[: G - 1]
        elif sel == "teacher+":
            chosen = np.argsort(-np.asarray(neg_scores), kind="stable")[: G - 1]
        elif sel == "first":
            chosen = np.arange(G - 1)
        else:
            chosen = rng.choice(len(neg), size=G - 1, replace=False)
        keys += [neg[i] for i in chosen]
        if group_scores is not None:
            group_scores += [neg_scores[i] for i in chosen]

    if cfg.stable_distill and group_scores is not None:
        keys, group_scores = sort_negatives_by_teacher(keys, group_scores)
    return {"query": record["query"], "keys": keys, "teacher_scores": group_scores, "positives": pos}


def sort_negatives_by_teacher(keys: list[str], scores: list[float]) -> tuple[list[str], list[float]]:
    """Sort the negatives (not the positive) by teacher score, descending, as stable distillation expects.

    The positive stays at index 0 even if a negative outscores it (reference §2.2 step 9).
    """
    order = sorted(range(1, len(keys)), key=lambda i: -scores[i])
    return [keys[0]] + [keys[i] for i in order], [scores[0]] + [scores[i] for i in order]
