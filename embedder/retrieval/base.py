"""The small interface every retriever (dense faiss, BM25 backends) implements, and resumable sharded search.

A retriever is used in two steps:

1. `prepare(corpus_texts, queries)`: build or reload its index (and, for dense retrieval, encode the queries).
   It returns False on the non-zero ranks of a multi-process run, which then have nothing left to do.
2. `search(rows, k)`: top-k for the queries `rows` (a range of query positions), as `(scores, ids)` arrays of
   shape (n, k), best first, ids `-1` where there are fewer than k results.

`search_in_shards` calls `search` one query shard at a time and saves each shard's result atomically, so a crashed
mining or evaluation run resumes without redoing finished shards.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedder.atomic import atomic_open

log = logging.getLogger(__name__)


class Retriever(ABC):
    """Base class: see the module docstring."""

    name: str = "retriever"

    @abstractmethod
    def prepare(self, corpus_texts: Sequence[str], queries: Sequence[str]) -> bool:
        """Index the corpus (or reload a saved index) and get the queries ready. False on non-zero ranks."""

    @abstractmethod
    def search(self, rows: range, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores (n, k) float32, ids (n, k) int64)` for queries `rows`, best first, `-1` padded."""

    def describe(self) -> dict[str, Any]:
        """Everything that changes the results (goes into result-cache fingerprints and the run's meta file)."""
        return {"retriever": self.name}


def pad_results(scores: list[list[float]], ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-query result lists -> (n, k) arrays padded with score -inf and id -1."""
    out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (s, i) in enumerate(zip(scores, ids)):
        n = min(k, len(i))
        out_s[r, :n] = s[:n]
        out_i[r, :n] = i[:n]
    return out_s, out_i


STALE_TEMP_S = 600  # a temp file untouched this long belongs to a killed run (a live writer finishes in seconds)


def remove_stale_temp_files(folder: str, pattern: str, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the temp files a killed run left in `folder` (by age, not by pid: the ranks of a multi-node job share
    the folder, and a pid from another node says nothing). Returns how many were removed."""
    import glob
    import time

    removed = 0
    for path in glob.glob(os.path.join(folder, pattern)):
        try:
            if time.time() - os.path.getmtime(path) > older_than_s:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:  # another process cleaned it up first
            pass
    if removed:
        log.info("removed %d stale temp file(s) of a killed run from %s", removed, folder)
    return removed


def search_in_shards(retriever: Retriever, num_queries: int, k: int, work_dir: str,
                     shard_size: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Search all queries, one shard of `shard_size` queries at a time, saving each shard to `work_dir`.

    A shard file that already exists is loaded instead of searched again, so an interrupted run resumes where it
    stopped. The caller names `work_dir` after everything that determines the results (retriever, corpus, queries,
    k), so stale shards are never mixed in.

    Returns:
        `(scores, ids)`, each (num_queries, k).
    """
    os.makedirs(work_dir, exist_ok=True)
    remove_stale_temp_files(work_dir, ".search-*.npz")
    num_shards = max(1, -(-num_queries // shard_size))
    all_scores, all_ids, reused = [], [], 0
    for s in range(num_shards):
        rows = range(s * shard_size, min((s + 1) * shard_size, num_queries))
        path = os.path.join(work_dir, f"search-{s:05d}-of-{num_shards:05d}.npz")
        if os.path.isfile(path):
            with np.load(path) as z:
                scores, ids = z["scores"], z["ids"]
            reused += 1
        else:
            scores, ids = retriever.search(rows, k)
            with atomic_open(path, suffix=".npz", binary=True) as f:
                np.savez(f, scores=scores, ids=ids)
        if scores.shape != (len(rows), k) or ids.shape != (len(rows), k):
            raise RuntimeError(f"{path}: search results of shape {ids.shape}, expected {(len(rows), k)}")
        all_scores.append(scores)
        all_ids.append(ids)
        if num_shards > 1:
            log.info("search shard %d/%d done (%d queries)", s + 1, num_shards, len(rows))
    if reused:
        log.info("reused %d of %d finished search shard(s) from %s", reused, num_shards, work_dir)
    return np.concatenate(all_scores, axis=0), np.concatenate(all_ids, axis=0)
