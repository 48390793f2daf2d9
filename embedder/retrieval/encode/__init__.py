"""Corpus and query encoding: sharded over devices with Lightning predict, saved per row range, resumable.

`encode_to_stores(encoder, jobs, trainer)` writes `EmbeddingStore` folders; `load_encode(path)` reads one back as a
(N, D) float32 array on any number of devices. See `store.py` for the layout and `predict.py` for how the work is cut.
"""

from __future__ import annotations

from embedder.retrieval.encode.predict import (
           EncodeJob,
           encode_to_stores,
           encoder_identity,
           make_predict_trainer,
           resolve_dtype,
)
from embedder.retrieval.encode.store import EmbeddingStore, StoreMismatch, load_encode

__all__ = ["EmbeddingStore", "EncodeJob", "StoreMismatch", "encode_to_stores", "encoder_identity", "load_encode",
           "make_predict_trainer", "resolve_dtype"]
