"""Retrieval evaluation: trec_eval-compatible ranking metrics, DPR answer recall, and a model-agnostic evaluator."""

from __future__ import annotations

from embedder.evaluation.metrics import QueryMetrics, compute_metrics, per_query_metrics
from embedder.evaluation.retrieval import RetrievalEvaluator
from embedder.retrieval.nq_answer import SimpleTokenizer, answer_recall, has_answer

__all__ = ["QueryMetrics", "RetrievalEvaluator", "SimpleTokenizer", "answer_recall", "compute_metrics", "has_answer",
           "per_query_metrics"]
