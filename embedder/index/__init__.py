"""Dense indexes. faiss itself is imported lazily, on first use."""

from __future__ import annotations

from embedder.index.faiss_index import FaissIndex, gpu_available, import_faiss, merge_topk

__all__ = ["FaissIndex", "gpu_available", "import_faiss", "merge_topk"]
