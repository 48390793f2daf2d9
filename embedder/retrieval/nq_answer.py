"""DPR-style answer recall (the reference's `--metrics nq`, `src/retrieval/evalnq.py`).

A passage "has the answer" when, after NFD normalisation, lowercasing and DPR's `SimpleTokenizer`, some answer's token
sequence occurs contiguously in the passage's tokens. `answer_recall@k` is the share of queries with such a passage
among their top k predictions.

Differences from the reference, on purpose:
- Results are keyed by **query id**, not by enumeration order (the reference assumes preds follow the eval file).
- Keys are `answer_recall@k`, not `recall@k`, so they do not clash with label-based recall.
- An answer that tokenises to nothing (e.g. `""`) never matches. In DPR an empty token list matches every passage.
- Queries without any answer are excluded from the mean (and counted in a log line), as for label-based metrics.
- Values are not rounded (the reference rounds to 4 decimals).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import lru_cache

import regex

logger = logging.getLogger(__name__)

DEFAULT_NQ_CUTOFFS = (1, 5, 10, 20, 100)


class SimpleTokenizer:
    """DPR's `SimpleTokenizer`: runs of letters, digits and marks, or any single other visible character.

    Tokens are lowercased (DPR's `words(uncased=True)`).
    """

    ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
    NON_WS = r"[^\p{Z}\p{C}]"

    def __init__(self) -> None:
        self._regexp = regex.compile(f"({self.ALPHA_NUM})|({self.NON_WS})",
                                     flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)

    def tokenize(self, text: str) -> list[str]:
        """Lowercased tokens of `text`."""
        return [m.group().lower() for m in self._regexp.finditer(text)]


_TOKENIZER = SimpleTokenizer()


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFD", text)


@lru_cache(maxsize=65536)
def _answer_tokens(answer: str) -> tuple[str, ...]:
    return tuple(_TOKENIZER.tokenize(_normalize(answer)))


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """Whether any answer's token sequence occurs contiguously in `text` (DPR's string match).

    Example:
        >>> has_answer("Barack Obama was born in Honolulu, Hawaii.", ["honolulu hawaii", "Chicago"])
        False
        >>> has_answer("Barack Obama was born in Honolulu, Hawaii.", ["Honolulu , Hawaii"])
        True
    """
    tokens = _TOKENIZER.tokenize(_normalize(text))
    for answer in answers:
        ans = _answer_tokens(answer)
        n = len(ans)
        if n == 0:
            continue  # DPR would match an empty answer everywhere; we never do
        for i in range(len(tokens) - n + 1):
            if tokens[i] == ans[0] and tuple(tokens[i:i + n]) == ans:
                return True
    return False


def first_answer_rank(pred: Sequence[int], answers: Sequence[str], text_of: Callable[[int], str],
                      limit: int) -> int | None:
    """1-based rank of the first passage in `pred[:limit]` that has an answer, or None. `-1` never has one."""
    for rank, doc in enumerate(pred[:limit], start=1):
        if doc != -1 and has_answer(text_of(doc), answers):
            return rank
    return None


def answer_recall(preds: Mapping[Hashable, Sequence[int]] | Sequence[Sequence[int]],
                  answers: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
                  corpus_texts: Sequence[str] | Mapping[int, str] | Callable[[int], str],
                  cutoffs: Sequence[int] = DEFAULT_NQ_CUTOFFS) -> dict[str, float]:
    """DPR top-k answer recall: `{"answer_recall@k": share of queries with an answer passage in the top k}`.

    Args:
        preds: `{qid: ranked doc ids}`, or a list in eval order (then `answers` must be a list too).
        answers: `{qid: answer strings}`, or a list in eval order. Queries are the keys of `answers`; a query with no
            predictions scores 0, a query with no answers is excluded from the mean.
        corpus_texts: passage text per doc id (a list, a dict, or a function `doc_id -> text`). The reference
            uses the corpus `key_template` text without instruction.
        cutoffs: positive ints k.

    Returns:
        `{"answer_recall@1": ..., "answer_recall@5": ...}`; NaN when no query has an answer.
    """
    if isinstance(preds, Mapping) != isinstance(answers, Mapping):
        raise TypeError("pass preds and answers both as dicts keyed by query id, or both as lists in eval order")
    preds = _as_mapping(preds, "preds")
    answers = _as_mapping(answers, "answers")
    cutoffs = sorted({int(k) for k in ([cutoffs] if isinstance(cutoffs, int) else cutoffs)})
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"cutoffs must be positive integers, got {cutoffs!r}")
    if isinstance(corpus_texts, str):
        raise TypeError("corpus_texts must be a list, dict or function of doc id, not a string")
    text_of = corpus_texts if callable(corpus_texts) else corpus_texts.__getitem__

    max_k = cutoffs[-1]
    firsts: list[int | None] = []
    excluded = 0
    for qid, ans in answers.items():
        if isinstance(ans, str):
            ans = [ans]
        if not any(_answer_tokens(a) for a in ans):
            excluded += 1
            continue
        firsts.append(first_answer_rank(list(preds.get(qid, ())), ans, text_of, max_k))
    if excluded:
        logger.warning("%d of %d queries have no answer and are excluded from answer recall",
                       excluded, len(answers))
    if not firsts:
        return {f"answer_recall@{k}": math.nan for k in cutoffs}
    return {f"answer_recall@{k}": sum(1 for r in firsts if r is not None and r <= k) / len(firsts) for k in cutoffs}


def _as_mapping(obj, what: str) -> Mapping:
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, (str, bytes)):
        raise TypeError(f"{what} must be a dict keyed by query id or a list in eval order")
    return dict(enumerate(obj))
