"""Hard-negative mining: retrieve for a training file (dense faiss or BM25) and keep the top non-positives.

`run_mine(cfg)` is what `mine.py` runs. The pieces are usable alone: `select_negatives` (one ranking -> negatives),
`DenseRetriever` / `make_bm25` (the `Retriever` interface), `search_in_shards` (resumable search),
and the checked, lazily read inputs `open_corpus` (`embedder.data.corpus`) and `load_queries`
(`embedder.data.queries`).
"""

from __future__ import annotations

from embedder.data.corpus import Corpus, open_corpus
from embedder.data.queries import QueryFile, load_queries
from embedder.mining.negatives import NegativeRule, mined_record, select_negatives
from embedder.retrieval.base import Retriever, search_in_shards

__all__ = ["Corpus", "NegativeRule", "QueryFile", "Retriever", "load_queries", "open_corpus", "mined_record",
           "run_mine", "search_in_shards", "select_negatives"]


def __getattr__(name: str):
    if name == "run_mine":  # imported on use: it pulls in hydra/omegaconf
        from embedder.mining.run import run_mine

        return run_mine
    raise AttributeError(name)
