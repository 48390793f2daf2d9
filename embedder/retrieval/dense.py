"""Dense retrieval: encode corpus and queries (sharded, resumable), index with faiss, search. The one
encode -> index -> search path of the package, with two ways to spread it over ranks:

- `DenseRetriever` (mining, `embedder.evaluate`): the ranks of a Lightning predict job encode the stores, rank 0
  builds one index (saved and reused) and searches; `search_in_shards` makes the search resumable.
- `sharded_search` (evaluation inside a training job, whose ranks already run in lockstep): each rank encodes
  the store shards `s % W == rank`, indexes its own corpus shards and searches every query, 16,384 queries at a
  time; each chunk's per-rank top-k lists are all-gathered and merged, so no rank holds more than 1/W of the
  corpus embeddings, nor more than one chunk of query embeddings and gathered candidates.

Folders under `work_dir` (reused by any later run with the same model and texts):

    encode/corpus-<hash>-<shard size>/    EmbeddingStore of the corpus (with the key instruction; `corpus_store_dir`
                                          puts it elsewhere)
    encode/queries-<hash>-<shard size>/   EmbeddingStore of the queries (with the query instruction)
    index/<factory>-<metric>-<hash>.faiss (+ .json sidecar)   the faiss index of that corpus store
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embedder.data.corpus import prefixed
from embedder.progress import peak_rss_gib
from embedder.retrieval.base import Retriever
from embedder.retrieval.encode import EncodeJob, encode_to_stores, encoder_identity
from embedder.retrieval.encode.predict import encode_in_lockstep
from embedder.retrieval.encode.store import EmbeddingStore
from embedder.retrieval.faiss_index import FaissIndex, merge_topk

log = logging.getLogger(__name__)


def store_name(what: str, fingerprint: str, shard_size: int) -> str:
    """The folder name of an embedding store (`corpus`/`queries`, the job's fingerprint, its shard size), one scheme
    for both paths, so a store written by one is found by the other in the same folder."""
    return f"{what}-{fingerprint[:16]}-{shard_size}"


def lock_path(store_path: str) -> str:
    """The lock file of a store: `<work_dir>/.locks/<store>.lock`, outside the folder of stores."""
    return os.path.join(os.path.dirname(os.path.dirname(store_path)), ".locks", os.path.basename(store_path) + ".lock")


class DenseRetriever(Retriever):
    """Encoder + faiss index.

    Args:
        encoder: a `DualEncoder` (anything with `encode(inputs, kind)`, `tokenizer`, `normalize`).
        work_dir: where embeddings and the index are saved and looked up.
        trainer: a Lightning Trainer for encoding (`embedder.retrieval.encode.make_predict_trainer`); None = one device.
        query_instruction, key_instruction: prepended to queries and corpus texts before encoding.
        query_max_length, key_max_length: token limits.
        batch_size: texts per forward pass.
        shard_size: rows per embedding shard (the unit of resume and of work across devices).
        index_factory: faiss factory string (Flat, IVF4096,Flat, HNSW32, IVF1024,PQ64, ...).
        metric: `auto` (cos for a normalising encoder, else ip), `cos`, `ip` or `l2`.
        use_gpu, search_params, train_sample: passed to `FaissIndex`.
        save_index: write the built index under `work_dir/index` and reload it next time.
        dtype: encoding dtype (`auto`: bf16 on GPU, fp32 on CPU).
        search_batch: queries per faiss search call.
        num_workers: DataLoader workers that tokenise shards while the model runs (0 = in the main process;
            `auto`: several on a GPU, 0 on a CPU, see `resolve_num_workers`).
        batch_tokens: fill each batch up to this many padded tokens instead of `batch_size` texts (0 = off; `auto`:
            32,768 on a GPU, 4,096 on a CPU).
        token_cache: keep the texts' token ids under `$EMBEDDER_CACHE/tokens`, so encoding them again (another
            model, the next mining round) skips tokenising.
        corpus_store_dir: the folder of the corpus store (default `work_dir/encode`); a recipe that mines with the
            encoder it is about to train points it at `untrained_stores_dir()`, where the training run's "before"
            evaluation finds the same store (same texts, lengths and weights) instead of encoding the corpus again.
    """

    name = "dense"

    def __init__(self, encoder: Any, work_dir: str, trainer: Any = None, query_instruction: str = "",
                 key_instruction: str = "", query_max_length: int = 256, key_max_length: int = 256,
                 batch_size: int = 128, shard_size: int = 100_000, index_factory: str = "Flat",
                 metric: str = "auto", use_gpu: bool | str = "auto", search_params: dict | None = None,
                 train_sample: int = 100_000, save_index: bool = True, dtype: str = "auto",
                 search_batch: int = 4096, num_workers: int | str = "auto", batch_tokens: int | str = 0,
                 token_cache: bool = True, corpus_store_dir: str | None = None):
        self.encoder, self.work_dir, self.trainer = encoder, work_dir, trainer
        self.corpus_store_dir = corpus_store_dir
        self.query_instruction, self.key_instruction = query_instruction or "", key_instruction or ""
        self.query_max_length, self.key_max_length = int(query_max_length), int(key_max_length)
        self.batch_size, self.shard_size = int(batch_size), int(shard_size)
        self.index_factory = index_factory
        if metric == "auto":
            metric = "cos" if getattr(encoder, "normalize", True) else "ip"
        self.metric = metric
        self.use_gpu, self.search_params = use_gpu, dict(search_params or {})
        self.train_sample, self.save_index, self.dtype = int(train_sample), bool(save_index), dtype
        self.search_batch, self.num_workers, self.batch_tokens = int(search_batch), num_workers, batch_tokens
        self.token_cache = bool(token_cache)
        self.index: FaissIndex | None = None
        self.q_emb: np.ndarray | None = None
        # search with the leading d dimensions of the stored (full) embeddings: evaluating a Matryoshka model at
        # several sizes encodes once (the cos metric normalises the prefixes again, as SentenceTransformer's
        # truncate_dim does); None = all
        self.truncate_dim: int | None = None
        self.corpus_store_path: str | None = None
        self.query_store_path: str | None = None
        self._stores: tuple[Any, Any] | None = None  # (corpus, queries) embedding stores, set by prepare
        self._corpus_fp = ""

    def describe(self) -> dict[str, Any]:
        return {"retriever": self.name, "model": getattr(self.encoder, "model_name_or_path", None),
                "index_factory": self.index_factory, "metric": self.metric, "search_params": self.search_params,
                "query_instruction": self.query_instruction, "key_instruction": self.key_instruction,
                "query_max_length": self.query_max_length, "key_max_length": self.key_max_length,
                **({"truncate_dim": self.truncate_dim} if self.truncate_dim else {}),
                # the store folders are named by a hash of texts + encoder weights: a retrained model with the
                # same path gets new search shards, never stale ones
                "corpus_store": self.corpus_store_path and os.path.basename(self.corpus_store_path),
                "query_store": self.query_store_path and os.path.basename(self.query_store_path)}

    def prepare(self, corpus_texts: Sequence[str], queries: Sequence[str]) -> bool:
        identity = encoder_identity(self.encoder)
        corpus_job = EncodeJob("corpus", prefixed(corpus_texts, self.key_instruction), "", kind="key",
                               max_length=self.key_max_length, shard_size=self.shard_size, identity=identity)
        query_job = EncodeJob("queries", prefixed(queries, self.query_instruction), "", kind="query",
                              max_length=self.query_max_length, shard_size=self.shard_size, identity=identity)
        corpus_fp = corpus_job.fingerprint()
        corpus_job.store_path = os.path.join(self.corpus_store_dir or os.path.join(self.work_dir, "encode"),
                                             store_name("corpus", corpus_fp, self.shard_size))
        query_job.store_path = os.path.join(self.work_dir, "encode",
                                            store_name("queries", query_job.fingerprint(), self.shard_size))
        self.corpus_store_path, self.query_store_path = corpus_job.store_path, query_job.store_path
        with self._cache_lock(corpus_job.store_path):
            return self._prepare_locked(corpus_job, query_job, corpus_fp, len(corpus_texts))

    def _cache_lock(self, store_path: str):
        """One run at a time per corpus cache entry: a second mine/evaluate on the same output_dir waits, then
        reuses what the first encoded and indexed, instead of encoding the corpus again. Only for single-process
        runs: the ranks of one distributed job encode together (each its own shards) and must not wait on each
        other."""
        import contextlib

        if self.trainer is not None and getattr(self.trainer, "world_size", 1) > 1:
            return contextlib.nullcontext()
        from filelock import FileLock

        os.makedirs(os.path.dirname(lock_path(store_path)), exist_ok=True)
        lock = FileLock(lock_path(store_path))
        try:
            return lock.acquire(timeout=0)  # a context that releases the lock
        except TimeoutError:
            log.info("another run is encoding into %s; waiting for it, then reusing its work", store_path)
            return lock.acquire()

    def _prepare_locked(self, corpus_job, query_job, corpus_fp: str, n_corpus: int) -> bool:
        stores = encode_to_stores(self.encoder, [corpus_job, query_job], self.trainer, batch_size=self.batch_size,
                                  dtype=self.dtype, num_workers=self.num_workers, batch_tokens=self.batch_tokens,
                                  token_cache=self.token_cache)
        if stores is None:  # a non-zero rank of a ddp run: its shards are written, rank 0 does the rest
            return False
        self._stores = stores
        self._build_index(corpus_fp, n_corpus)
        return True

    def set_truncate_dim(self, dim: int | None) -> None:
        """Search with the leading `dim` dimensions (None: all) of the embeddings `prepare` stored: the query
        matrix and the index are rebuilt from the stores (or a saved index), nothing is encoded again."""
        if self._stores is None:
            raise RuntimeError("call prepare(corpus_texts, queries) before set_truncate_dim")
        self.truncate_dim = int(dim) if dim else None
        n_corpus, self.index = self.index.ntotal, None  # the previous size's index is freed before the next is built
        self._build_index(self._corpus_fp, n_corpus)

    def _build_index(self, corpus_fp: str, n_corpus: int | None) -> None:
        corpus_store, query_store = self._stores
        self._corpus_fp = corpus_fp
        self.q_emb = self._prefix(query_store.load())  # (Q, d)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.index_factory)
        dim = f"-d{self.truncate_dim}" if self.truncate_dim else ""
        index_path = os.path.join(self.work_dir, "index", f"{safe}-{self.metric}{dim}-{corpus_fp[:16]}.faiss")
        if self.save_index and os.path.isfile(index_path) and os.path.isfile(index_path + ".json"):
            self.index = FaissIndex.load(index_path, use_gpu=self.use_gpu, search_params=self.search_params)
            log.info("reusing the faiss index %s (%d vectors)", index_path, self.index.ntotal)
        else:
            self.index = FaissIndex(self.index_factory, self.metric, use_gpu=self.use_gpu,
                                    search_params=self.search_params)
            self.index.build(self._prefix(corpus_store.load(mmap=True)), train_sample=self.train_sample)  # (N, d)
            if self.save_index:
                self.index.save(index_path)
                log.info("saved the faiss index to %s", index_path)
        if n_corpus is not None and self.index.ntotal != n_corpus:
            raise RuntimeError(f"the index holds {self.index.ntotal} vectors for a corpus of {n_corpus}")

    def _prefix(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, truncate_dim): the leading dimensions (all without truncate_dim)."""
        if not self.truncate_dim:
            return emb
        if self.truncate_dim > emb.shape[1]:
            raise ValueError(f"truncate_dims: {self.truncate_dim} is larger than the embeddings ({emb.shape[1]})")
        return np.ascontiguousarray(emb[:, :self.truncate_dim])

    def search(self, rows: range, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None or self.q_emb is None:
            raise RuntimeError("call prepare(corpus_texts, queries) before search")
        scores, ids = [], []
        for start in range(rows.start, rows.stop, self.search_batch):
            stop = min(start + self.search_batch, rows.stop)
            s, i = self.index.search(self.q_emb[start:stop], k)  # (b, k), (b, k)
            scores.append(s)
            ids.append(i)
        if not ids:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(ids)


def dense_retriever(work_dir: str, run_cfg: Any, encoder: Any = None, trainer: Any = None,
                    query_instruction: str = "", key_instruction: str = "", batch_size: int = 128,
                    shard_size: int = 100_000, dtype: str = "auto", search_batch: int = 4096, num_workers: int | str = "auto",
                    batch_tokens: int | str = 0, token_cache: bool = True,
                    corpus_store_dir: str | None = None) -> DenseRetriever:
    """`retriever=dense`'s factory (configs/retriever/dense.yaml): the encoder (`model`, `model_path`; loaded here
    when not given), a Lightning predict trainer (`trainer`), the faiss `index` settings and the run's lengths."""
    from omegaconf import OmegaConf

    from embedder.retrieval.encode import make_predict_trainer
    from embedder.retrieval.encode.model import load_encoder

    encoder = encoder if encoder is not None else load_encoder(run_cfg.model, run_cfg.get("model_path"))
    icfg = run_cfg.index
    return DenseRetriever(
        encoder, work_dir, trainer=trainer or make_predict_trainer(run_cfg.get("trainer")),
        query_instruction=query_instruction, key_instruction=key_instruction,
        query_max_length=run_cfg.query_max_length, key_max_length=run_cfg.key_max_length,
        batch_size=batch_size, shard_size=shard_size, index_factory=icfg.factory, metric=icfg.similarity,
        use_gpu=icfg.use_gpu, search_params=OmegaConf.to_container(icfg.search_params) if icfg.search_params else None,
        train_sample=icfg.train_sample, save_index=icfg.save, dtype=dtype, search_batch=search_batch,
        num_workers=num_workers, batch_tokens=batch_tokens, token_cache=token_cache,
        corpus_store_dir=corpus_store_dir)


def sharded_search(encoder: Any, corpus_texts: Sequence[str], queries: Sequence[str], folder: str,
                   identity: dict[str, Any], *, name: str, metric: str, hits: int, rank: int, world: int,
                   barrier: Callable[[], None], all_gather: Callable[[Any], list[Any]], query_max_length: int = 256,
                   key_max_length: int = 256, shard_size: int = 100_000, batch_size: int = 128,
                   batch_tokens: int | str = "auto", num_workers: int | str = "auto", token_cache: bool = True,
                   index_factory: str = "Flat", use_gpu: bool | str = "auto", search_params: dict | None = None,
                   train_sample: int = 100_000, query_chunk: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """`(scores, ids)`, each (Q, hits), of `queries` (instruction included) over `corpus_texts` (likewise), the same
    on every rank: the per-rank shard strategy of the module docstring. Stores go under `folder` (their names
    hash the texts and `identity`, so finished shards are reused); every rank runs the same number of forward
    passes (ZeRO-3), and 1 or W ranks give the same ranking (ties broken by id). `ids` are corpus rows, -1 where
    fewer than `hits` exist. `query_chunk`: queries searched and merged across ranks at a time (bounds the memory
    of the search and of the gather to that many queries)."""
    jobs = [EncodeJob(f"{name} corpus", corpus_texts, "", kind="key", max_length=key_max_length,
                      shard_size=shard_size, identity=identity),
            EncodeJob(f"{name} queries", queries, "", kind="query", max_length=query_max_length,
                      shard_size=shard_size, identity=identity)]
    for job, what in zip(jobs, ("corpus", "queries")):
        fp = job.fingerprint()  # hashes every text: once
        job.store_path = os.path.join(folder, store_name(what, fp, job.shard_size))
        EmbeddingStore.create(job.store_path, len(job.texts), job.shard_size, fp,
                              info={"name": job.name, "kind": job.kind, "max_length": job.max_length})
    pending = [(j, s) for j, job in enumerate(jobs) for s in EmbeddingStore(job.store_path).missing_shards()]
    barrier()  # every rank has listed the missing shards before any rank writes one
    units_per_rank = [[u for u in pending if u[1] % world == rr] for rr in range(world)]
    if rank == 0:
        done = sum(EmbeddingStore(j.store_path).num_shards for j in jobs) - len(pending)
        log.info("eval %s: encoding %d shard(s) on %d rank(s)%s", name, len(pending), world,
                 f" ({done} reused from {folder})" if done else "")
    t0 = time.monotonic()
    encode_in_lockstep(encoder, jobs, units_per_rank, rank, batch_size=batch_size, batch_tokens=batch_tokens,
                       num_workers=num_workers, token_cache=token_cache)
    t_encode = time.monotonic() - t0
    barrier()  # every shard is on disk

    corpus_store, query_store = (EmbeddingStore(j.store_path) for j in jobs)
    mine = [s for s in range(corpus_store.num_shards) if s % world == rank]
    t0, t_index, n_rows, index = time.monotonic(), 0.0, 0, None
    if mine:
        index = FaissIndex(index_factory, metric, use_gpu=use_gpu, search_params=search_params)
        # one shard in memory at a time besides the index: the first trains it (IVF/PQ), each is then added
        index.build(corpus_store.read_shard(mine[0], mmap=True), train_sample=train_sample)
        for s in mine[1:]:
            index.add(corpus_store.read_shard(s, mmap=True))  # (shard rows, D)
        t_index, n_rows = time.monotonic() - t0, index.ntotal
        rows = np.concatenate([np.arange(corpus_store.shard_rows(s).start, corpus_store.shard_rows(s).stop)
                               for s in mine])
    # The queries are searched and merged a chunk at a time: many queries (re-mining 500k training queries on 8
    # ranks) never put all their embeddings, nor 8 ranks' candidates for all of them, in one rank's memory; only the
    # merged (Q, hits) result grows with Q, as mine.py's. Every rank runs the same chunks (one all_gather each).
    all_scores, all_ids = [], []
    for qs in range(query_store.num_shards):
        q_shard = query_store.read_shard(qs, mmap=True)  # (shard rows, D)
        for a in range(0, len(q_shard), query_chunk):
            q_emb = np.ascontiguousarray(q_shard[a:a + query_chunk])  # (chunk, D)
            if index is not None:
                scores, local = index.search(q_emb, hits)  # (chunk, hits)
                ids = np.where(local < 0, -1, rows[np.maximum(local, 0)])
            else:  # more ranks than shards
                scores = np.full((len(q_emb), hits), np.inf if metric == "l2" else -np.inf, np.float32)
                ids = np.full((len(q_emb), hits), -1, np.int64)
            scores, ids = merge_topk(all_gather((scores, ids)), hits, metric)  # (chunk, hits)
            all_scores.append(scores)
            all_ids.append(ids)
    del index
    scores = np.concatenate(all_scores) if all_scores else np.zeros((0, hits), np.float32)  # (Q, hits)
    ids = np.concatenate(all_ids) if all_ids else np.zeros((0, hits), np.int64)
    log.info("eval %s rank %d/%d: encoded %d shard(s) in %.1f s, indexed %d rows in %.1f s, searched %d queries in "
             "%.1f s, peak RSS %.0f MB", name, rank, world, len(units_per_rank[rank]), t_encode, n_rows, t_index,
             len(ids), time.monotonic() - t0 - t_index, peak_rss_gib() * 1024)
    return scores, ids


