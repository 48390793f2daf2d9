"""Retrieval evaluation records and their scoring: rankings and qrels in, metrics out.

The corpus search itself is `embedder.retrieval` (the package's one encode -> index -> search path): in-training
evaluation (`eval_set.EvalSet`) and `embedder.evaluate` search there and pass the rankings to `score`, which owns
every metric, graded nDCG included. The one thing the evaluator encodes itself is a rerank set's own candidates
(`mode="rerank"`, `evaluate()`), through an `encode(texts, kind)` callable, so it works with any model; the caller
adds the query/key instructions inside `encode`. It reproduces the reference's `eval_retrieval.py` scoring (§4.1) and
the in-training `retrieval` / `rerank` evaluation (§2.10), with these fixes:

- Labels are matched to predictions by query id, never by position (the reference's `nq` metric used position).
- Answer recall is reported as `answer_recall@k`, not `recall@k`.
- Bad records fail before any encoding, with the file and line: an empty query, a `pos_index` outside the corpus,
  a corpus line missing a `key_template` field, `key`/`key_index` of different lengths, repeated query ids.

Record fields (eval file, one JSON object per line):
    query (str, required), query_id / qid (optional; default: the 0-based row index, as in the reference),
    pos_index (relevant corpus rows; needed by mrr/recall/ndcg/map/precision), pos_relevance (optional: their grades;
    where any grade is not 1, ndcg is graded), answers (needed by `nq`),
    key + key_index (rerank mode: the candidates' texts and, optionally, their corpus rows).
Corpus: one record per row; a document's id is its 0-based row. Its text is `key_template.format(**record)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from embedder.data.corpus import Corpus
from embedder.data.records import check_query_record, format_key
from embedder.errors import DataError, no_records_error
from embedder.evaluation.metrics import METRICS as RANKING_METRICS
from embedder.evaluation.metrics import compute_metrics, graded_ndcg
from embedder.retrieval.faiss_index import METRICS as DENSE_METRICS
from embedder.retrieval.nq_answer import answer_recall

logger = logging.getLogger(__name__)

# an eval set's `mode` as configs spell it -> the evaluator's mode; the one table train.py and embedder.evaluate use
MODES = {"retrieval": "retrieve", "retrieve": "retrieve", "rerank": "rerank"}

EncodeFn = Callable[[list[str], str], Any]  # (texts, "query" | "key") -> (N, D) array


@dataclass
class _Query:
    qid: Hashable
    line: int
    text: str
    labels: list[int] | None
    answers: list[str] | None
    keys: list[str] | None = None
    key_index: list[int] | None = None
    relevance: list[float] | None = None  # the grade of each label (graded qrels), None: binary


class RetrievalEvaluator:
    """Evaluate a dense retriever on eval records and a corpus.

    Args:
        encode: `encode(texts, kind) -> (N, D)` array (numpy or torch), `kind` is `"query"` or `"key"`: how a
            rerank set's candidates are encoded; None where the rankings come from `embedder.retrieval` (`score`).
        queries: eval records (dicts), or `(line, record)` pairs as yielded by `embedder.data.jsonl.iter_jsonl`
            (then errors name the real file line).
        corpus: a `Corpus` (`embedder.data.corpus.open_corpus`: JSON lines or parquet, read on access), or corpus
            records (dicts, or plain strings used as-is). Required in `mode="retrieve"`.
        key_template: how a corpus record becomes text, e.g. `"{title} {text}"` or `"{contents}"`.
        metrics: any of `mrr`, `recall`, `ndcg`, `map`, `precision` (label-based, from `pos_index`) and `nq`
            (DPR answer recall from `answers`, reported as `answer_recall@k`).
        cutoffs: the k of every `metric@k`.
        hits: how many documents a ranking holds per query (rerank: how many candidates are kept).
        metric: `"cos"`, `"ip"` or `"l2"` (how a rerank set's candidates are scored).
        mode: `"retrieve"`: rankings over the corpus are scored (`score`); `"rerank"`: `evaluate()` scores each
            record's own `key` candidates.
        corpus_path, queries_path: file names used in error messages only.
        chunk_size: texts per `encode` call.

    Example:
        >>> evaluator = RetrievalEvaluator(None, list(iter_jsonl("test.json")), corpus, metrics=["ndcg", "nq"],
        ...                                cutoffs=[1, 10], corpus_path="corpus.json")  # doctest: +SKIP
        >>> metrics = evaluator.score(preds)  # preds: {query id: [corpus rows, best first]}  # doctest: +SKIP
        >>> # metrics: {"ndcg@1": ..., "answer_recall@10": ...}
    """

    def __init__(self, encode: EncodeFn | None, queries: Iterable[dict | tuple[int, dict]],
                 corpus: Sequence[dict | str] | Iterable[tuple[int, dict]] | None = None, *,
                 key_template: str = "{title} {text}",
                 metrics: Sequence[str] = ("mrr", "recall", "ndcg"),
                 cutoffs: Sequence[int] = (1, 5, 10, 100),
                 hits: int = 100,
                 metric: Literal["cos", "ip", "l2"] = "cos",
                 mode: Literal["retrieve", "rerank"] = "retrieve",
                 corpus_path: str | None = None,
                 queries_path: str | None = None,
                 chunk_size: int = 65536):
        if mode not in ("retrieve", "rerank"):
            raise ValueError(f"mode must be 'retrieve' or 'rerank', got {mode!r}")
        if hits < 1:
            raise ValueError(f"hits must be >= 1, got {hits}")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [m for m in metrics if m != "nq" and m not in RANKING_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(RANKING_METRICS + ('nq',))}")
        self.encode = encode
        self.key_template = key_template
        self.ranking_metrics = [m for m in metrics if m != "nq"]
        self.use_nq = "nq" in metrics
        self.cutoffs = [cutoffs] if isinstance(cutoffs, int) else list(cutoffs)
        self.hits = int(hits)
        if metric not in DENSE_METRICS:
            raise ValueError(f"metric must be one of {', '.join(DENSE_METRICS)}, got {metric!r}")
        self.metric = metric
        self.mode = mode
        self.corpus_path = corpus_path
        self.queries_path = queries_path
        self.chunk_size = int(chunk_size)
        if self.cutoffs and max(self.cutoffs) > self.hits:
            logger.warning("cutoff %d is larger than hits=%d: metrics at that cutoff only see the top %d results",
                           max(self.cutoffs), self.hits, self.hits)

        self.corpus_texts: list[str] | None = None if corpus is None else self._format_corpus(corpus)
        if mode == "retrieve" and not self.corpus_texts:
            raise DataError("retrieval evaluation needs a non-empty corpus", path=corpus_path,
                            hint="pass corpus=[...] (or use mode='rerank' for records that carry their own 'key')")
        self.queries = self._parse_queries(queries)
        self._check_required_fields()
        # graded qrels (a grade other than 1): nDCG uses the grades as gains (trec_eval's ndcg_cut, what BEIR and MTEB
        # report), for every caller alike: in-training evaluation and `embedder.evaluate` give one number
        self.graded: dict[Hashable, dict[int, float]] | None = None
        if any(q.relevance and any(g != 1 for g in q.relevance) for q in self.queries):
            self.graded = {q.qid: dict(zip(q.labels, q.relevance or [1.0] * len(q.labels)))
                           for q in self.queries if q.labels is not None}

    @classmethod
    def from_files(cls, encode: EncodeFn, queries_path: str, corpus_path: str | None = None,
                   data_root: str | None = None, **kwargs: Any) -> RetrievalEvaluator:
        """Read the eval and corpus JSON-lines files (`llm-embedder:` paths resolve against `data_root`)."""
        from embedder.data.corpus import open_corpus
        from embedder.data.jsonl import iter_jsonl
        from embedder.paths import resolve_path

        queries_path = resolve_path(queries_path, data_root)
        corpus = None
        if corpus_path is not None:
            corpus_path = resolve_path(corpus_path, data_root)
            corpus = open_corpus(corpus_path, kwargs.get("key_template", "{title} {text}"))
        return cls(encode, list(iter_jsonl(queries_path)), corpus, corpus_path=corpus_path,
                   queries_path=queries_path, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> tuple[dict[str, float], dict[Hashable, list[int]]]:
        """Rerank mode: encode each record's query and own candidates, rank them, and score.

        Returns:
            `(metrics, preds)`: `{"mrr@10": ..., "answer_recall@10": ...}` and `{query id: ranked corpus ids}`
            (without `key_index`: positions in the record's `key` list).
        """
        if self.mode != "rerank":
            raise ValueError("a retrieval set is searched by embedder.retrieval (DenseRetriever, sharded_search); "
                             "pass its rankings to score()")
        q_emb = self._encode([q.text for q in self.queries], "query")  # (Q, D)
        preds, nq_preds, nq_texts = self._rerank(q_emb)
        return self.score(preds, nq_preds, nq_texts), preds

    def score(self, preds: dict[Hashable, list[int]], nq_preds: dict[Hashable, list[int]] | None = None,
              nq_texts: Sequence[str] | None = None) -> dict[str, float]:
        """The metrics of rankings `{query id: corpus rows, best first}`: label metrics from `pos_index`, answer
        recall from `answers` over the ranked texts (retrieve mode: the corpus's)."""
        metrics: dict[str, float] = {}
        if self.ranking_metrics:
            labels = {q.qid: q.labels for q in self.queries if q.labels is not None}
            metrics.update(compute_metrics(preds, labels, self.ranking_metrics, self.cutoffs))
            if self.graded is not None and "ndcg" in self.ranking_metrics:
                metrics.update(graded_ndcg(preds, self.graded, self.cutoffs))
        if self.use_nq:
            nq_preds = preds if nq_preds is None else nq_preds
            answers = {q.qid: q.answers for q in self.queries if q.answers is not None}
            texts = self.corpus_text_lookup(nq_preds) if nq_texts is None else nq_texts
            metrics.update(answer_recall(nq_preds, answers, texts, self.cutoffs))
        return metrics

    def _rerank(self, q_emb: np.ndarray) -> tuple[dict, dict, list[str]]:
        """Score each query's own candidates; also return preds over the flattened key list for answer recall."""
        flat_keys = [k for q in self.queries for k in q.keys]
        k_emb = self._encode(flat_keys, "key") if flat_keys else np.zeros((0, q_emb.shape[1]), np.float32)  # (M, D)
        self._check_dims(q_emb, k_emb)
        if self.metric == "cos":
            q_emb, k_emb = _normalize(q_emb), _normalize(k_emb)
        preds, flat_preds, start = {}, {}, 0
        for row, q in enumerate(self.queries):
            cand = k_emb[start:start + len(q.keys)]  # (n, D)
            if self.metric == "l2":
                scores = -((cand - q_emb[row]) ** 2).sum(axis=1)  # (n,): higher is better
            else:
                scores = cand @ q_emb[row]  # (n,)
            order = np.argsort(-scores, kind="stable")[:self.hits]  # ties keep candidate order
            preds[q.qid] = [q.key_index[j] for j in order] if q.key_index is not None else [int(j) for j in order]
            flat_preds[q.qid] = [start + int(j) for j in order]
            start += len(q.keys)
        return preds, flat_preds, flat_keys

    def _encode(self, texts: list[str], kind: str) -> np.ndarray:
        chunks = []
        for i in range(0, len(texts), self.chunk_size):
            batch = texts[i:i + self.chunk_size]
            if self.encode is None:
                raise RuntimeError("this evaluator was built without an encode function (it only checks and scores: "
                                   "pass rankings to score()); give it one to evaluate()")
            emb = self.encode(batch, kind)
            if hasattr(emb, "detach"):  # torch tensor
                emb = emb.detach().float().cpu().numpy()
            emb = np.asarray(emb, dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != len(batch):
                raise ValueError(f"encode(texts, {kind!r}) must return an array of shape (len(texts), dim); "
                                 f"got shape {emb.shape} for {len(batch)} texts")
            chunks.append(emb)
        return np.concatenate(chunks, axis=0)  # (N, D)

    @staticmethod
    def _check_dims(q_emb: np.ndarray, k_emb: np.ndarray) -> None:
        if len(k_emb) and q_emb.shape[1] != k_emb.shape[1]:
            raise ValueError(f"query embeddings have dimension {q_emb.shape[1]} but key embeddings "
                             f"{k_emb.shape[1]}; encode must use the same output size for both kinds")

    # ------------------------------------------------------------------ input checks
    def _format_corpus(self, corpus: Iterable) -> Sequence[str]:
        """Corpus texts: a `Corpus` (JSON lines or parquet, read on access) is used as it is; records are
        formatted with `key_template` (the data contract's `format_key`); plain strings are used as they are."""
        if isinstance(corpus, Corpus):
            return corpus
        texts = []
        for line, record in _with_lines(corpus):
            texts.append(record if isinstance(record, str) else
                         format_key(record, self.key_template, self.corpus_path, line))
        return texts

    def corpus_text_lookup(self, preds: dict[Hashable, list[int]]) -> Mapping[int, str] | Sequence[str]:
        """Texts of the predicted documents (answer recall reads them): a lazily read corpus fetches them in one
        pass (each parquet row group once) instead of one read per query and rank."""
        if isinstance(self.corpus_texts, Corpus):
            return self.corpus_texts.take({i for ids in preds.values() for i in ids[:max(self.cutoffs)]})
        return self.corpus_texts

    def _parse_queries(self, queries: Iterable) -> list[_Query]:
        """Check every record with the data contract (`check_query_record`); query ids must be unique."""
        path, out, seen = self.queries_path, [], {}
        n_corpus = None if self.corpus_texts is None else len(self.corpus_texts)
        for row, (line, rec) in enumerate(_with_lines(queries)):
            q = check_query_record(rec, path, line, row, n_corpus, rerank=self.mode == "rerank")
            qid = q.query_id
            if qid in seen:
                raise DataError(f"query id {qid!r} repeats the one on line {seen[qid]}", path=path, line=line,
                                field="query_id", hint="query ids must be unique; predictions are keyed by them")
            seen[qid] = line
            out.append(_Query(qid, line, q.query, q.pos_index if q.has_labels else None,
                              q.answers if q.has_answers else None, q.keys, q.key_index, q.pos_relevance))
        if not out:
            raise no_records_error(path, "eval records")
        return out

    def _check_required_fields(self) -> None:
        if self.ranking_metrics and all(q.labels is None for q in self.queries):
            raise DataError(f"metrics {self.ranking_metrics} need 'pos_index', but no eval record has it",
                            path=self.queries_path, field="pos_index",
                            hint="add pos_index (relevant corpus rows), or evaluate with metrics=[nq] and 'answers'")
        if self.use_nq and all(q.answers is None for q in self.queries):
            raise DataError("metric 'nq' needs 'answers', but no eval record has it", path=self.queries_path,
                            field="answers", hint="add answers, or drop 'nq' from metrics")


def _with_lines(records: Iterable) -> Iterable[tuple[int, Any]]:
    """`(line, record)`: pairs pass through; bare records get `position + 1`."""
    for pos, item in enumerate(records):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            yield item
        else:
            yield pos + 1, item


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # (N, D)
