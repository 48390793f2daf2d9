"""Retrieval: encoders to on-disk stores, dense (faiss) and BM25 indexes, resumable sharded search, answer matching.

One path used by in-training evaluation (`embedder.evaluation.eval_set`), standalone evaluation
(`embedder.evaluate`) and mining (`embedder.mining`); those two packages import from here and never from each other.

- `encode/`: `encode_to_stores` / `encode_in_lockstep` write `EmbeddingStore` shards (Lightning predict, any number
  of devices); `load_encoder` reads an exported or Hub model.
- `faiss_index.FaissIndex`: one faiss index (factory string, GPU where present), `merge_topk` for sharded search.
- `base.Retriever` and `search_in_shards`: the retriever interface and resumable search; `dense.DenseRetriever`,
  `bm25.make_bm25`; `build.build_retriever` picks one from a config.
- `nq_answer.has_answer`: DPR answer matching (false-negative filtering in mining, answer recall in evaluation).
"""

from __future__ import annotations

from embedder.retrieval.base import Retriever, search_in_shards
from embedder.retrieval.faiss_index import FaissIndex, merge_topk
from embedder.retrieval.nq_answer import has_answer

__all__ = ["FaissIndex", "Retriever", "has_answer", "merge_topk", "search_in_shards"]
