"""A small faiss wrapper: any index factory string, cos / ip / l2, optional GPU, device-count-independent files.

- `cos` L2-normalises corpus and queries and searches by inner product; `ip` is the raw inner product; `l2` is the
  squared Euclidean distance. Results are always ordered best first: scores descending for cos/ip, distances
  ascending for l2. Missing results (fewer than k documents, or an IVF probe that found too few) have id `-1` and
  score `-inf` (cos/ip) or `+inf` (l2), and come last.
- The GPU is used only when `faiss` has GPU support and sees a GPU (`hasattr(faiss, "StandardGpuResources") and
  faiss.get_num_gpus() > 0`) and `use_gpu` is not False. One log line (logger `embedder.retrieval.faiss_index`) says which backend
  was chosen. Indexes that faiss cannot put on a GPU (e.g. HNSW) stay on the CPU, and the log line says so.
- `save` always writes a CPU index plus a JSON sidecar, so a saved index reloads on any number of devices. (The
  reference names its files `…{rank}-{world_size}.faiss`, so they only reload with the same GPU count.)
- `merge_topk` merges per-shard top-k lists correctly for every metric (the reference sorts l2 distances descending,
  which keeps the *worst* documents).

faiss is imported lazily, so `import embedder` works without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Metric = Literal["cos", "ip", "l2"]
METRICS = ("cos", "ip", "l2")
SIDECAR_SUFFIX = ".json"


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")
_mixed_checked = False


def faiss_distributions() -> list[str]:
    """The installed pip distributions that provide the `faiss` module."""
    import importlib.metadata

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
            found.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def mixed_install_message(found: list[str]) -> str | None:
    """A warning when CPU and GPU faiss wheels are installed together: they overwrite each other's `faiss` module,
    so which one imports depends on install order."""
    if "faiss-cpu" in found and any(n.startswith("faiss-gpu") for n in found):
        gpu = next(n for n in found if n.startswith("faiss-gpu"))
        return (f"both faiss-cpu and {gpu} are installed; they provide the same `faiss` module and overwrite each "
                f"other. Keep one: `pip uninstall -y faiss-cpu {gpu} && pip install {gpu}` (or `make setup-gpu`)")
    return None


def import_faiss() -> Any:
    """Import faiss, or raise an ImportError that says what to install; warns once about a mixed CPU+GPU install."""
    global _mixed_checked
    try:
        import faiss
    except ImportError as e:
        raise ImportError("faiss is required for dense indexing and search: pip install faiss-cpu "
                          "(GPU search: pip install faiss-gpu-cu12 instead, or `make setup-gpu`)") from e
    if not _mixed_checked:
        _mixed_checked = True
        msg = mixed_install_message(faiss_distributions())
        if msg:
            logger.warning("%s", msg)
    return faiss


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return metric


def _as_matrix(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 (N, D) copy-or-view of `x` (numpy array or torch tensor)."""
    if hasattr(x, "detach"):  # torch tensor, possibly on GPU or in bf16
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]} but the index has dimension {dim}")
    return x


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class FaissIndex:
    """A faiss index built from an index factory string.

    Args:
        factory: a faiss index factory string: `"Flat"` (exact), `"IVF4096,Flat"`, `"HNSW32"`, `"IVF1024,PQ64"`, ...
        metric: `"cos"` (normalise, then inner product), `"ip"` (inner product) or `"l2"` (squared distance).
        use_gpu: `"auto"` (GPU when available), True (GPU wanted; falls back to CPU with a warning) or False.
        device: GPU id when a GPU is used.
        search_params: faiss runtime parameters set through `ParameterSpace`, e.g. `{"nprobe": 32}` for IVF or
            `{"efSearch": 128}` for HNSW.
        gpu_fp16: store GPU copies in float16 (the reference does; halves memory, slightly inexact).

    Example:
        >>> index = FaissIndex("Flat", metric="cos").build(corpus_embeddings)   # doctest: +SKIP
        >>> scores, ids = index.search(query_embeddings, k=100)                # (Q, 100) each  # doctest: +SKIP
    """

    def __init__(self, factory: str = "Flat", metric: Metric = "cos", use_gpu: bool | str = "auto",
                 device: int = 0, search_params: Mapping[str, float] | None = None, gpu_fp16: bool = False):
        if use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        self.factory = factory
        self.metric = _check_metric(metric)
        self.use_gpu = use_gpu
        self.device = device
        self.search_params = dict(search_params or {})
        self.gpu_fp16 = gpu_fp16
        self.dim: int | None = None
        self.backend: str | None = None  # "cpu" or "gpu:<id>" once the index exists
        self._index: Any = None
        self._gpu_res: Any = None  # must outlive the GPU index

    # ------------------------------------------------------------------ building
    @property
    def ntotal(self) -> int:
        """Number of vectors in the index (0 before `build`)."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (CPU or GPU), for anything this wrapper does not cover."""
        return self._index

    def build(self, embeddings: Any, train_sample: int = 100_000, seed: int = 0) -> FaissIndex:
        """Create the index, train it if it needs training, and add `embeddings` (N, D).

        Trainable indexes (IVF, PQ, ...) are trained on `min(train_sample, N)` rows drawn at random with `seed`.
        Returns self.
        """
        faiss = import_faiss()
        x = self._prepare(_as_matrix(embeddings, "embeddings"))  # (N, D)
        self.dim = int(x.shape[1])
        faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        try:
            cpu_index = faiss.index_factory(self.dim, self.factory, faiss_metric)
        except RuntimeError as e:
            raise ValueError(f"faiss could not build index factory {self.factory!r} for dimension {self.dim}: "
                             f"{str(e).strip().splitlines()[-1]}") from e
        self._index = self._place(cpu_index)
        if not self._index.is_trained:
            n_train = min(int(train_sample), len(x))
            rows = np.random.default_rng(seed).choice(len(x), size=n_train, replace=False)
            rows.sort()
            self._index.train(x[rows])  # (n_train, D)
        self._index.add(x)
        return self

    def add(self, embeddings: Any) -> FaissIndex:
        """Add more vectors (N, D); their ids continue from `ntotal`. Builds the index on first use. Returns self."""
        if self._index is None:
            return self.build(embeddings)
        x = self._prepare(_as_matrix(embeddings, "embeddings", self.dim))  # (N, D)
        self._index.add(x)
        return self

    # ------------------------------------------------------------------ searching
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k search for queries (Q, D).

        Returns:
            `(scores, ids)`, both (Q, k), best first: scores float32 (similarity for cos/ip, squared distance for
            l2), ids int64 with `-1` for missing results (score `-inf` for cos/ip, `+inf` for l2).
        """
        if self._index is None:
            raise RuntimeError("the index is empty: call build(embeddings) or FaissIndex.load(path) first")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._prepare(_as_matrix(queries, "queries", self.dim))  # (Q, D)
        scores, ids = self._index.search(q, int(k))  # (Q, k), (Q, k)
        scores = np.array(scores, dtype=np.float32)
        ids = np.array(ids, dtype=np.int64)
        scores[ids < 0] = np.inf if self.metric == "l2" else -np.inf
        ids[ids < 0] = -1
        order = best_first(scores, ids, self.metric)  # equal scores by id: one order, however the corpus is cut
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Write the CPU form of the index to `path` and `{factory, metric, dim, ntotal, ...}` to `path + ".json"`."""
        if self._index is None:
            raise RuntimeError("nothing to save: the index was never built")
        faiss = import_faiss()
        cpu_index = faiss.index_gpu_to_cpu(self._index) if self.backend != "cpu" else self._index
        from embedder.atomic import atomic_path, write_json

        with atomic_path(path, suffix=".faiss") as tmp:
            faiss.write_index(cpu_index, tmp)
        write_json(path + SIDECAR_SUFFIX, {"factory": self.factory, "metric": self.metric, "dim": self.dim,
                                           "ntotal": self.ntotal, "search_params": self.search_params,
                                           "faiss_version": getattr(faiss, "__version__", None)})

    @classmethod
    def load(cls, path: str, use_gpu: bool | str = "auto", device: int = 0,
             search_params: Mapping[str, float] | None = None, gpu_fp16: bool = False) -> FaissIndex:
        """Read an index written by `save`, on GPU or CPU as `use_gpu` says (any number of devices)."""
        faiss = import_faiss()
        sidecar = path + SIDECAR_SUFFIX
        if not os.path.isfile(path):
            raise FileNotFoundError(f"faiss index file {path!r} not found")
        if not os.path.isfile(sidecar):
            raise FileNotFoundError(f"{sidecar!r} not found: FaissIndex.load needs the JSON sidecar written by "
                                    f"FaissIndex.save next to the index file")
        from embedder.atomic import read_json

        meta = read_json(sidecar, "faiss index sidecar", f"delete {path} and its sidecar; the next run builds the "
                         "index again")
        params = dict(meta.get("search_params") or {})
        params.update(search_params or {})
        self = cls(meta["factory"], meta["metric"], use_gpu=use_gpu, device=device, search_params=params,
                   gpu_fp16=gpu_fp16)
        cpu_index = faiss.read_index(path)
        if cpu_index.d != meta["dim"] or cpu_index.ntotal != meta["ntotal"]:
            raise ValueError(f"{path!r} holds {cpu_index.ntotal} vectors of dimension {cpu_index.d}, but its sidecar "
                             f"says {meta['ntotal']} of dimension {meta['dim']}; the two files do not belong together")
        self.dim = int(cpu_index.d)
        self._index = self._place(cpu_index)
        return self

    # ------------------------------------------------------------------ internals
    def _prepare(self, x: np.ndarray) -> np.ndarray:
        return _l2_normalize(x) if self.metric == "cos" else x

    def _place(self, cpu_index: Any) -> Any:
        """Move `cpu_index` to the GPU when wanted and possible, apply search params, and log the backend once."""
        faiss = import_faiss()
        index, on_gpu, why = cpu_index, False, "use_gpu=False"
        if self.use_gpu is not False:
            if not hasattr(faiss, "StandardGpuResources"):
                why = "this faiss build has no GPU support (faiss-cpu)"
            elif faiss.get_num_gpus() == 0:
                why = "faiss sees no GPU"
            else:
                try:
                    self._gpu_res = faiss.StandardGpuResources()
                    options = faiss.GpuClonerOptions()
                    options.useFloat16 = self.gpu_fp16
                    index = faiss.index_cpu_to_gpu(self._gpu_res, self.device, cpu_index, options)
                    on_gpu = True
                except (RuntimeError, AttributeError) as e:
                    self._gpu_res = None
                    why = f"faiss cannot put {self.factory!r} on a GPU: {str(e).strip().splitlines()[-1]}"
        self.backend = f"gpu:{self.device}" if on_gpu else "cpu"
        self._apply_search_params(faiss, index)
        if self.backend != "cpu":
            logger.info("faiss index %r (metric %s): GPU backend on device %d%s", self.factory, self.metric,
                        self.device, ", float16" if self.gpu_fp16 else "")
        else:
            log = logger.warning if self.use_gpu is True else logger.info
            log("faiss index %r (metric %s): CPU backend (%s)", self.factory, self.metric, why)
        return index

    def _apply_search_params(self, faiss: Any, index: Any) -> None:
        if not self.search_params:
            return
        space = faiss.GpuParameterSpace() if self.backend != "cpu" else faiss.ParameterSpace()
        for name, value in self.search_params.items():
            try:
                space.set_index_parameter(index, name, value)
            except RuntimeError as e:
                raise ValueError(f"search parameter {name}={value!r} does not apply to index {self.factory!r}: "
                                 f"{str(e).splitlines()[0]}") from e


def best_first(scores: np.ndarray, ids: np.ndarray, metric: Metric) -> np.ndarray:
    """Per row, the column order that puts results best first, equal scores by ascending id, missing (`-1`) last.

    Breaking ties by id makes a search over one index and a merge over any sharding of the corpus agree exactly
    (duplicate passages have equal scores).
    """
    key = (scores if metric == "l2" else -scores).astype(np.float64)  # ascending key = best first
    missing = ids < 0
    key[missing] = np.inf
    tie = np.where(missing, np.iinfo(np.int64).max, ids)
    return np.lexsort((tie, key), axis=1)  # (Q, n): sorts by key, then by id


def merge_topk(shards: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: Metric,
               offsets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard `(scores, ids)` search results into one global top-k, best first.

    Args:
        shards: one `(scores (Q, k_s), ids (Q, k_s))` per shard, as returned by `FaissIndex.search`.
        k: how many results to keep per query.
        metric: `"cos"`/`"ip"` keep the largest scores, `"l2"` the smallest distances.
        offsets: added to each shard's ids (not to `-1`) to make them global, e.g. the shard's first row in the
            corpus. None when the ids are global already.

    Returns:
        `(scores, ids)`, each (Q, k). `-1` results rank last; equal scores rank by id, as in `FaissIndex.search`.
    """
    metric = _check_metric(metric)
    if not shards:
        raise ValueError("merge_topk needs at least one shard")
    if offsets is not None and len(offsets) != len(shards):
        raise ValueError(f"got {len(offsets)} offsets for {len(shards)} shards")
    all_scores, all_ids = [], []
    for s, (scores, ids) in enumerate(shards):
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if scores.shape != ids.shape or scores.ndim != 2:
            raise ValueError(f"shard {s}: scores {scores.shape} and ids {ids.shape} must have the same (Q, k) shape")
        if offsets is not None:
            ids = np.where(ids < 0, -1, ids + int(offsets[s]))
        all_scores.append(scores)
        all_ids.append(ids)
    scores = np.concatenate(all_scores, axis=1)  # (Q, sum k_s)
    ids = np.concatenate(all_ids, axis=1)  # (Q, sum k_s)
    order = best_first(scores, ids, metric)[:, :k]  # (Q, min(k, sum k_s))
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    worst = np.inf if metric == "l2" else -np.inf
    top_scores[top_ids < 0] = worst
    if top_ids.shape[1] < k:  # fewer candidates than k: pad with missing results
        pad = k - top_ids.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=worst)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores, top_ids
