"""Ranking metrics (mrr, recall, ndcg, map, precision @ k) that agree exactly with trec_eval / pytrec_eval.

Conventions (the same as trec_eval run on a TREC run whose scores decrease with rank):

- **Binary relevance.** `labels[qid]` lists the relevant document ids; everything else is non-relevant. Repeated
  labels count once.
- **Predictions are ranked lists**, best first. `-1` entries (faiss's padding for "no result") are dropped.
  **Duplicates keep their first occurrence** and later repeats are removed *before* cutting at k, so `pred[:k]` holds
  k distinct documents. trec_eval cannot even represent a repeated document in a run, and the reference's ndcg
  would count a repeated relevant document twice (ndcg > 1 is possible there).
- **Queries without any relevant document** (absent from `labels`, or an empty label list) are **excluded from the
  mean**, as trec_eval skips topics absent from the qrels. Their ids are returned in `QueryMetrics.excluded` and
  `compute_metrics` logs how many were excluded. (The reference averages over `len(preds)`, adds 0 for mrr, divides
  by zero for recall and makes ndcg NaN.)
- **Queries with labels but no predictions count as 0** for every metric (trec_eval's `-c` convention; pytrec_eval
  does the same for a query whose run is empty).
- If no query has a relevant document, every metric is NaN.

Definitions, with rank i 1-based, `rel(i) = 1` if the i-th distinct prediction is relevant, `R = |labels|`:

| key | definition | trec_eval measure |
|---|---|---|
| `mrr@k` | `1 / i` for the first relevant i ≤ k, else 0 | `recip_rank` on the run cut to k |
| `recall@k` | `Σ_{i≤k} rel(i) / R` | `recall_k` |
| `ndcg@k` | `Σ_{i≤k} rel(i)/log2(i+1)` / `Σ_{j≤min(R,k)} 1/log2(j+1)` | `ndcg_cut_k` |
| `map@k` | `Σ_{i≤k} rel(i) · precision@i / R` (denominator R, not min(R, k)) | `map_cut_k` |
| `precision@k` | `Σ_{i≤k} rel(i) / k` (k, even when fewer than k were retrieved) | `P_k` |

Agreement with the reference (`src/retrieval/metrics.py`): mrr@k, recall@k (`|unique(label ∩ pred[:k])| / |label|`)
and ndcg@k (binary gains, IDCG over `min(|label|, k)`) have the same formulas. The reference differs from trec_eval,
and from us, only where the conventions above differ: it keeps duplicate predictions (its ndcg counts a repeated
relevant document twice, and its `pred[:k]` may hold fewer than k distinct documents), its `|label|` counts
repeated labels, and it averages over every query in `preds` rather than over the queries that have a relevant
document. The reference has no map or precision.

Why hand-written: torchmetrics' retrieval metrics only see the documents that were retrieved, so recall's denominator
and ndcg's ideal DCG miss relevant documents that were not retrieved (matching trec_eval would mean padding every
query with fake documents); pytrec_eval / ir-measures need string ids and dict-of-dict runs and are a C extension we
keep as a test-only oracle. The formulas below are a few vectorised numpy lines over a (queries, k) hit matrix, and
`tests/test_metrics.py` checks them against pytrec_eval on randomised runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("mrr", "recall", "ndcg", "map", "precision")
DEFAULT_METRICS = ("mrr", "recall", "ndcg", "map")
DEFAULT_CUTOFFS = (1, 5, 10, 100)


@dataclass
class QueryMetrics:
    """Per-query metric values.

    Attributes:
        qids: the evaluated queries (those with at least one relevant document), in `labels` order.
        values: `{"ndcg@10": array of shape (len(qids),), ...}`.
        excluded: queries seen in `preds` or `labels` that have no relevant document, so are left out of the mean.
    """

    qids: list[Hashable]
    values: dict[str, np.ndarray]
    excluded: list[Hashable] = field(default_factory=list)

    def mean(self) -> dict[str, float]:
        """Mean over the evaluated queries; NaN for every metric when there are none."""
        if not self.qids:
            return {name: math.nan for name in self.values}
        return {name: float(v.mean()) for name, v in self.values.items()}


def per_query_metrics(preds: Mapping[Hashable, Sequence[int]], labels: Mapping[Hashable, Iterable[int]],
                      metrics: Sequence[str] = DEFAULT_METRICS,
                      cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> QueryMetrics:
    """Compute every `metric@cutoff` for every query that has a relevant document.

    Args:
        preds: `{qid: ranked doc ids, best first}`. `-1` entries are dropped; repeats keep their first occurrence.
        labels: `{qid: relevant doc ids}` (binary relevance).
        metrics: names from `mrr`, `recall`, `ndcg`, `map`, `precision`.
        cutoffs: positive ints k.

    Returns:
        A `QueryMetrics`; see the module docstring for the conventions.
    """
    metrics = _check_metrics(metrics)
    cutoffs = _check_cutoffs(cutoffs)
    max_k = cutoffs[-1]

    qids: list[Hashable] = []
    relevant: list[set] = []
    for qid, label in labels.items():
        label_set = set(label)
        if label_set:
            qids.append(qid)
            relevant.append(label_set)
    evaluated = set(qids)
    excluded = [qid for qid in labels if qid not in evaluated]
    excluded += [qid for qid in preds if qid not in evaluated and qid not in labels]

    hits = np.zeros((len(qids), max_k), dtype=np.float64)  # (Q, K): 1.0 where the i-th distinct pred is relevant
    for row, (qid, label_set) in enumerate(zip(qids, relevant)):
        ranked = _distinct(preds.get(qid, ()), max_k)
        hits[row, :len(ranked)] = [doc in label_set for doc in ranked]
    num_rel = np.array([len(s) for s in relevant], dtype=np.float64)  # (Q,)

    ranks = np.arange(1, max_k + 1, dtype=np.float64)  # (K,)
    cum_hits = np.cumsum(hits, axis=1)  # (Q, K): relevant docs in the top i
    has_hit = hits.any(axis=1)  # (Q,)
    first_rank = np.where(has_hit, hits.argmax(axis=1) + 1, max_k + 1)  # (Q,): 1-based rank of the first hit
    discount = 1.0 / np.log2(ranks + 1.0)  # (K,)
    ideal_dcg = np.cumsum(discount)  # (K,): IDCG when min(R, k) = index + 1
    precision_at_i = cum_hits / ranks  # (Q, K)

    values: dict[str, np.ndarray] = {}
    for name in metrics:
        for k in cutoffs:
            if name == "mrr":
                v = np.where(first_rank <= k, 1.0 / first_rank, 0.0)
            elif name == "recall":
                v = cum_hits[:, k - 1] / num_rel
            elif name == "precision":
                v = cum_hits[:, k - 1] / k
            elif name == "ndcg":
                dcg = (hits[:, :k] * discount[:k]).sum(axis=1)  # (Q,)
                idcg = ideal_dcg[np.minimum(num_rel, k).astype(np.int64) - 1]  # (Q,)
                v = dcg / idcg
            else:  # map
                v = (hits[:, :k] * precision_at_i[:, :k]).sum(axis=1) / num_rel
            values[f"{name}@{k}"] = v
    return QueryMetrics(qids=qids, values=values, excluded=excluded)


def compute_metrics(preds: Mapping[Hashable, Sequence[int]], labels: Mapping[Hashable, Iterable[int]],
                    metrics: Sequence[str] = DEFAULT_METRICS,
                    cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> dict[str, float]:
    """Mean `metric@k` over the queries that have a relevant document, e.g. `{"mrr@10": 0.41, "ndcg@10": ...}`.

    Agrees exactly with pytrec_eval (`recip_rank` on the run cut to k, `recall_k`, `ndcg_cut_k`, `map_cut_k`, `P_k`)
    when the run gives each query's predictions decreasing scores in rank order. Queries without a relevant document
    are excluded from the mean and counted in one log line; queries with labels but no predictions score 0. See the
    module docstring for the definitions and where the reference differs.

    Example:
        >>> compute_metrics({"q1": [3, 7, 1]}, {"q1": [7]}, metrics=["mrr", "recall"], cutoffs=[1, 5])
        {'mrr@1': 0.0, 'mrr@5': 0.5, 'recall@1': 0.0, 'recall@5': 1.0}
    """
    result = per_query_metrics(preds, labels, metrics, cutoffs)
    if result.qids and preds and not any(qid in preds for qid in result.qids):
        logger.warning("no query id of preds matches a query id of labels (e.g. preds %r, labels %r): every query "
                       "scores 0; check that both use the same ids and types", next(iter(preds)), result.qids[0])
    if result.excluded:
        logger.warning("%d of %d queries have no relevant document and are excluded from the metrics "
                       "(trec_eval convention); %d queries evaluated", len(result.excluded),
                       len(result.excluded) + len(result.qids), len(result.qids))
    return result.mean()


def _distinct(ranked: Iterable, limit: int) -> list:
    """The first `limit` distinct ids of `ranked`, dropping -1, keeping each id's first occurrence."""
    out: dict = {}
    for doc in ranked:
        if doc == -1 or doc in out:
            continue
        out[doc] = None
        if len(out) == limit:
            break
    return list(out)


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    out = []
    for name in metrics:
        if name == "nq":
            raise ValueError("metric 'nq' (answer recall) needs passage texts and answers: use "
                             "embedder.evaluation.answer_recall, or RetrievalEvaluator(metrics=[..., 'nq'])")
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    return out


def _check_cutoffs(cutoffs: Sequence[int]) -> list[int]:
    if isinstance(cutoffs, int):
        cutoffs = [cutoffs]
    out = sorted({int(k) for k in cutoffs})
    if not out or out[0] < 1:
        raise ValueError(f"cutoffs must be positive integers, got {list(cutoffs)!r}")
    return out


def graded_ndcg(preds: Mapping[Hashable, Sequence[int]], qrels: Mapping[Hashable, Mapping[int, float]],
                cutoffs: Sequence[int]) -> dict[str, float]:
    """trec_eval `ndcg_cut_k` with graded gains: `Σ_{i≤k} g_i/log2(i+1)` over the ideal ordering of all grades.

    `preds`: ranked doc ids (-1 dropped, repeats keep their first occurrence); `qrels`: `{qid: {doc: grade}}`.
    Queries without a positive grade are excluded from the mean (trec_eval convention). Returns `{"ndcg@k": ...}`.
    """
    cutoffs = sorted({int(k) for k in cutoffs})
    max_k = cutoffs[-1]
    discount = 1.0 / np.log2(np.arange(2, max_k + 2, dtype=np.float64))  # (K,)
    per_k: dict[int, list[float]] = {k: [] for k in cutoffs}
    for qid, grades in qrels.items():
        positive = sorted((float(g) for g in grades.values() if g > 0), reverse=True)
        if not positive:
            continue
        seen: dict[int, None] = {}
        for d in preds.get(qid, ()):
            if d != -1 and d not in seen:
                seen[d] = None
                if len(seen) == max_k:
                    break
        gains = np.array([float(grades.get(d, 0)) for d in seen] + [0.0] * (max_k - len(seen)))  # (K,)
        ideal = np.array(positive[:max_k] + [0.0] * max(0, max_k - len(positive)))  # (K,)
        for k in cutoffs:
            idcg = float((ideal[:k] * discount[:k]).sum())
            per_k[k].append(float((gains[:k] * discount[:k]).sum()) / idcg)
    return {f"ndcg@{k}": (float(np.mean(v)) if v else math.nan) for k, v in per_k.items()}


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A plain before -> after table of evaluation metrics."""
    lines = [f"{'metric':<34}{'before':>10}{'after':>10}{'change':>10}"]
    for key in sorted(after):
        b = before.get(key)
        a = after[key]
        lines.append(f"{key:<34}{(f'{b:.4f}' if b is not None else '-'):>10}{a:>10.4f}"
                     f"{(f'{a - b:+.4f}' if b is not None else ''):>10}")
    return "\n".join(lines)
