"""Turn one query's retrieval ranking into hard negatives (the reference's `collate_neg`, with its filter fixed).

The reference's positive filter is `pred = [i for i in pred if i != pos_index]`, which compares an int with a list
and so never removes anything; only the text comparison with `pos` caught positives. Here a candidate is dropped
when any of these holds, and every drop is counted by reason:

- its ranking position is outside `rank_range` (`[lo, hi)`, 0-based positions in the retrieved list; `lo > 0`
  skips the top hits, which are often unlabelled positives, i.e. false negatives); with `rank_range_of="filtered"`
  the positions are counted among the hits that pass every filter below, as sentence-transformers'
  `mine_hard_negatives` counts `range_min`/`range_max` (a query with many positives near the top then gets the
  same depth of negatives as one with a single positive);
- its corpus row is in `pos_index`;
- its text equals a `pos` text (after collapsing whitespace and case);
- its text repeats an earlier negative's (duplicated corpus passages);
- `filter_answers` is on and it contains an answer: case-insensitive substring, as in the reference, or
  `answer_match="token"` for DPR's token-sequence match (`has_answer`), which does not fire on "1" inside "1984".

A record left with fewer than `random_fill` negatives gets random corpus passages up to that many
(`fill_with_random`), as FlagEmbedding's `hn_mine.py` fills a short list: otherwise a query whose ranking holds
nothing but positives and near-positives has no negative and leaves training.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedder.data.jsonl import iter_jsonl
from embedder.errors import DataError
from embedder.retrieval.nq_answer import has_answer

MARGIN_DROP = "within the margin of a positive (likely false negative)"  # the margin filter's count


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the key for 'same text' comparisons."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class NegativeRule:
    """How negatives are picked from a ranking.

    Attributes:
        rank_range: `(lo, hi)`: only ranking positions `lo <= i < hi` (0-based) are candidates; `hi=None` = all.
        rank_range_of: what `rank_range`'s positions count: `ranking` (every retrieved hit, the reference) or
            `filtered` (the hits left after the positive, duplicate, answer and margin filters).
        max_neg_num: keep at most this many negatives (the reference default is 100).
        filter_answers: drop candidates that contain an answer.
        answer_match: `substring` (the reference) or `token` (DPR `has_answer`).
        relative_margin: false-negative filter (sentence-transformers' `mine_hard_negatives` has the same): drop a
            candidate whose retrieval score is above `(1 - relative_margin) ×` the best-ranked positive's score. It
            applies to queries whose positive is among the retrieved hits; None = off.
        random_fill: a record left with fewer negatives than this gets random corpus passages (not positives, not
            repeats) up to this many (FlagEmbedding's `hn_mine.py`); None = off (a record with none is left out).
    """

    rank_range: tuple[int, int | None] = (0, None)
    rank_range_of: str = "ranking"
    max_neg_num: int = 100
    filter_answers: bool = False
    answer_match: str = "substring"
    relative_margin: float | None = None
    random_fill: int | None = None

    @classmethod
    def for_hits(cls, hits: int, rank_range: Sequence[int | None] | None, **kwargs: Any) -> NegativeRule:
        """The rule for rankings of `hits` documents: `rank_range` as a config gives it (`[lo]`, `[lo, hi]`,
        `hi` null = up to `hits`, or null = all), its end checked against `hits`. `mine.py` and re-mining use it."""
        lo, hi = (list(rank_range) + [None])[:2] if rank_range is not None else (0, None)
        hi = int(hits) if hi is None else int(hi)
        if hi > int(hits):
            raise ValueError(f"rank_range end {hi} is beyond hits={hits}: retrieve at least that many (hits={hi})")
        return cls(rank_range=(int(lo or 0), hi), **kwargs)

    def __post_init__(self) -> None:
        lo, hi = self.rank_range
        if lo < 0 or (hi is not None and hi <= lo):
            raise ValueError(f"rank_range must be [lo, hi) with 0 <= lo < hi, got {list(self.rank_range)}")
        if self.rank_range_of not in ("ranking", "filtered"):
            raise ValueError(f"rank_range_of must be 'ranking' or 'filtered', got {self.rank_range_of!r}")
        if self.max_neg_num < 1:
            raise ValueError(f"max_neg_num must be >= 1, got {self.max_neg_num}")
        if self.answer_match not in ("substring", "token"):
            raise ValueError(f"answer_match must be 'substring' or 'token', got {self.answer_match!r}")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1), got {self.relative_margin}")
        if self.random_fill is not None and not 1 <= self.random_fill <= self.max_neg_num:
            raise ValueError(f"random_fill must be in [1, max_neg_num={self.max_neg_num}] or null, "
                             f"got {self.random_fill}")


def _contains_answer(text: str, answers: Sequence[str], match: str) -> bool:
    if match == "substring":
        low = text.lower()
        return any(a.lower() in low for a in answers if a)
    return has_answer(text, answers)


def select_negatives(ranked: Sequence[int], corpus_texts: Sequence[str], rule: NegativeRule,
                     pos_index: Sequence[int] = (), pos: Sequence[str] = (),
                     answers: Sequence[str] = (), scores: Sequence[float] | None = None
                     ) -> tuple[list[int], list[str], Counter]:
    """Pick negatives from one ranking.

    Args:
        ranked: corpus rows, best first (`-1` = no result, skipped).
        corpus_texts: row -> text (without instruction), the texts written to `neg`.
        rule: rank range, cap and answer filter.
        pos_index, pos, answers: the record's positives (rows and texts) and answers.
        scores: the retrieval scores of `ranked` (needed by `rule.relative_margin`).

    Returns:
        `(neg_index, neg, dropped)`: the kept rows, their texts, and a Counter of drop reasons.
    """
    lo, hi = rule.rank_range
    pos_rows = set(pos_index)
    pos_norm = {normalize_text(p) for p in pos}
    seen: set[str] = set()
    ceiling = None
    if rule.relative_margin is not None and scores is not None:
        pos_scores = [float(s) for d, s in zip(ranked, scores) if int(d) in pos_rows]
        if pos_scores:
            best = max(pos_scores)
            ceiling = best - rule.relative_margin * abs(best)
    neg_index: list[int] = []
    neg: list[str] = []
    dropped: Counter = Counter()
    by_ranking = rule.rank_range_of == "ranking"
    passed = 0  # hits that passed every filter so far (the position `rank_range_of="filtered"` counts)
    for position, doc in enumerate(ranked):
        if by_ranking and hi is not None and position >= hi:
            break
        doc = int(doc)
        if doc < 0:
            continue
        if by_ranking and position < lo:
            dropped["above rank range"] += 1
            continue
        if doc in pos_rows:
            dropped["positive (pos_index)"] += 1
            continue
        text = corpus_texts[doc]
        norm = normalize_text(text)
        if norm in pos_norm:
            dropped["positive (same text as pos)"] += 1
            continue
        if norm in seen:
            dropped["duplicate text"] += 1
            continue
        if rule.filter_answers and answers and _contains_answer(text, answers, rule.answer_match):
            dropped["contains an answer"] += 1
            continue
        if ceiling is not None and float(scores[position]) > ceiling:
            dropped[MARGIN_DROP] += 1
            continue
        seen.add(norm)
        if not by_ranking:
            passed += 1
            if passed <= lo:
                dropped["above rank range"] += 1
                continue
            if hi is not None and passed > hi:
                break
        neg_index.append(doc)
        neg.append(text)
        if len(neg) == rule.max_neg_num:
            break
    return neg_index, neg, dropped


def random_rows(n_docs: int, record_row: int, need: int, n_pos: int, seed: int) -> np.ndarray:
    """Candidate corpus rows for `fill_with_random`: `need + n_pos + 8` distinct rows (all rows of a smaller corpus)
    in random order, seeded by `(seed, record_row)`, so a record gets the same draw in any block, shard or rerun.
    O(draws), not O(corpus): numpy draws a small sample without replacement without permuting the population."""
    rng = np.random.default_rng([seed, record_row])
    return rng.choice(n_docs, size=min(n_docs, need + n_pos + 8), replace=False)


def fill_with_random(neg_index: list[int], neg: list[str], want: int, candidates: Sequence[int],
                     texts: Mapping[int, str], pos_index: Sequence[int] = (), pos: Sequence[str] = ()) -> int:
    """Append `candidates` (random rows, texts in `texts`) to `neg_index`/`neg` in place until there are `want`,
    skipping positives (by row and by text) and repeats of a kept negative (by row and by text).

    Returns how many were appended (fewer than asked when the candidates run out: a tiny or all-positive corpus).
    """
    pos_rows = set(pos_index)
    taken = set(neg_index)
    norms = {normalize_text(p) for p in pos} | {normalize_text(t) for t in neg}
    added = 0
    for doc in candidates:
        if len(neg) >= want:
            break
        doc = int(doc)
        if doc in pos_rows or doc in taken:
            continue
        norm = normalize_text(texts[doc])
        if norm in norms:
            continue
        taken.add(doc)
        norms.add(norm)
        neg_index.append(doc)
        neg.append(texts[doc])
        added += 1
    return added


def fill_block(block: Sequence[tuple[int, Sequence[int], Sequence[str], list[int], list[str]]], corpus,
               want: int, seed: int) -> tuple[int, int]:
    """`fill_with_random` for a block of records, in place: each entry is `(record row, pos_index, pos, neg_index,
    neg)`, and every entry with fewer than `want` negatives gets its own draw (`random_rows`). The drawn texts of the
    whole block are fetched in one `corpus.take` (a parquet corpus reads each row group once per block).

    Returns `(records filled, negatives added)`."""
    draws = [(entry, random_rows(len(corpus), int(entry[0]), want - len(entry[4]), len(entry[1]), seed))
             for entry in block if len(entry[4]) < want]
    if not draws:
        return 0, 0
    texts = corpus.take(np.unique(np.concatenate([rows for _, rows in draws])).tolist())
    filled = added = 0
    for (_, pos_index, pos, neg_index, neg), rows in draws:
        n = fill_with_random(neg_index, neg, want, rows, texts, pos_index, pos)
        filled += n > 0
        added += n
    return filled, added


def negatives_for_rankings(queries: Iterable, ids: np.ndarray, scores: np.ndarray, corpus, rule: NegativeRule,
                           seed: int, dropped: Counter, counts: Counter) -> Iterator[dict]:
    """The mined records of a whole query file: `queries` (checked `QueryRecord`s, in file order) with their
    rankings `ids`/`scores` (Q, hits), negatives picked by `rule` (`select_negatives`, then `fill_block` when
    `rule.random_fill`), each record as `mined_record` writes it; a record left without negatives is not yielded.
    Drop reasons are counted into `dropped`, and `no negatives`, `filled`, `random negatives` into `counts`.

    Streamed: the candidate texts of a block of 1024 queries are fetched together (a parquet corpus reads each row
    group once per block), and only that block's records are in memory. Used by `mine.py` and by re-mining with
    the model being trained."""
    hi = rule.rank_range[1] if rule.rank_range_of == "ranking" else None  # "filtered" may reach every hit
    block, records = 1024, iter(queries)
    for start in range(0, len(ids), block):
        rows, row_scores = ids[start:start + block, :hi], scores[start:start + block, :hi]
        texts = corpus.take(int(i) for i in np.unique(rows) if i >= 0)
        picked = []
        for rec, ranked, ranked_scores in zip(itertools.islice(records, block), rows, row_scores):
            neg_index, neg, why = select_negatives(ranked, texts, rule, rec.pos_index, rec.pos, rec.answers,
                                                   ranked_scores)
            dropped.update(why)
            picked.append((rec, neg_index, neg))
        if rule.random_fill:
            filled, added = fill_block([(rec.row, rec.pos_index, rec.pos, neg_index, neg)
                                        for rec, neg_index, neg in picked], corpus, rule.random_fill, seed)
            counts["filled"] += filled
            counts["random negatives"] += added
        for rec, neg_index, neg in picked:
            if not neg:
                counts["no negatives"] += 1
                continue
            yield mined_record(rec.record, neg_index, neg)


def fill_records(records: Iterable[dict], corpus, want: int, seed: int, counts: Counter) -> Iterator[dict]:
    """Mined records (one per line of their training file, in its order) with short negative lists filled
    (`fill_block`, seeded by the line's position as `run_mine` seeds it); a record still without negatives is left
    out. Counts `filled`, `random negatives` and `no negatives` into `counts`. Streamed in blocks of 1024."""
    numbered = enumerate(records)
    while block := list(itertools.islice(numbered, 1024)):
        entries = [(row, rec.get("pos_index") or [], rec.get("pos") or [], list(rec.get("neg_index") or []),
                    list(rec.get("neg") or [])) for row, rec in block]
        filled, added = fill_block(entries, corpus, want, seed)
        counts["filled"] += filled
        counts["random negatives"] += added
        for (_, rec), (_, _, _, neg_index, neg) in zip(block, entries):
            if not neg:
                counts["no negatives"] += 1
                continue
            yield {**rec, "neg": neg, "neg_index": neg_index}


def mined_record(record: dict, neg_index: list[int], neg: list[str]) -> dict:
    """The original record with `neg`/`neg_index` replaced and the stale `teacher_scores` removed."""
    out = {k: v for k, v in record.items() if k != "teacher_scores"}
    out["neg"] = neg
    out["neg_index"] = neg_index
    return out


def merge_negatives(train_path: str, paths: list[str], max_neg_num: int,
                    keep_empty: bool = False) -> Iterator[dict[str, Any]]:
    """One record per train query with the negatives of every mined file, alternating (1st of each, 2nd of each,
    ...) and de-duplicated by row, at most `max_neg_num`. Queries a file has no negatives for keep the other files'
    ones; queries no file has negatives for are left out, as `mine.py` leaves them out, or with `keep_empty` kept
    as their train record with no negatives (for `fill_records`: then there is one record per train line).

    Streamed: every mined file lists its queries in `train_path`'s order (mining keeps the input order and only
    drops queries), so one pass over all the files at once pairs them up, holding one record per file."""
    readers = [iter_jsonl(path) for path in paths]
    heads: list[dict[str, Any] | None] = [next(r, (0, None))[1] for r in readers]
    for _, train_rec in iter_jsonl(train_path):
        qid = str(train_rec["query_id"])
        found = []
        for i, head in enumerate(heads):
            if head is not None and str(head["query_id"]) == qid:
                found.append(head)
                heads[i] = next(readers[i], (0, None))[1]
        if not found:
            if keep_empty:
                yield {**train_rec, "neg": [], "neg_index": []}
            continue
        rows, neg_index, neg = set(), [], []
        for rank in range(max(len(rec["neg_index"]) for rec in found)):
            for rec in found:
                if rank < len(rec["neg_index"]) and rec["neg_index"][rank] not in rows and len(neg) < max_neg_num:
                    rows.add(rec["neg_index"][rank])
                    neg_index.append(rec["neg_index"][rank])
                    neg.append(rec["neg"][rank])
        yield {**found[0], "neg": neg, "neg_index": neg_index}
    left = [path for path, head in zip(paths, heads) if head is not None]
    if left:  # a query out of order or not in the train file: the files were not mined from this train file
        raise DataError("mined negatives out of step with the train file", path=left[0],
                        hint=f"delete {os.path.dirname(left[0])} and run again; it is mined again from {train_path}")
