"""On-disk embeddings in fixed row-range shards: the layout does not depend on how many devices wrote it.

A store is a folder::

    meta.json           {"format": 1, "num_rows": N, "shard_size": S, "num_shards": ceil(N/S), "dim": D,
                         "fingerprint": "...", "info": {...}}
    shard-00000.npy     float32 (min(S, N), D): rows [0, S)
    shard-00001.npy     rows [S, 2S)
    ...

Shard `s` always holds rows `[s*S, min((s+1)*S, N))`, whichever rank encoded it, so a corpus encoded on 8 GPUs
reloads on 1 CPU and vice versa (the reference names its files `{rank}-{world_size}`, tying them to one device
count). Each shard is written to a temp file and renamed, so a shard file on disk is always complete: a crashed run
resumes by encoding only the shards that are missing. `fingerprint` identifies the texts and the encoder; a folder
written for other texts or another model is never silently reused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from embedder.atomic import atomic_open, read_json, write_json

FORMAT = 1
META = "meta.json"


class StoreMismatch(ValueError):
    """The folder holds embeddings of other texts, another model or another shard size."""


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.npy"


class EmbeddingStore:
    """A folder of row-range shards of float32 embeddings (see the module docstring for the layout).

    Example:
        >>> store = EmbeddingStore.create("enc/corpus", num_rows=10, shard_size=4, fingerprint="abc")  # doctest: +SKIP
        >>> store.missing_shards()        # [0, 1, 2]: rows 0-3, 4-7, 8-9                    # doctest: +SKIP
        >>> store.write_shard(0, emb)     # (4, D) float32, atomic                            # doctest: +SKIP
    """

    def __init__(self, path: str):
        self.path = str(path)
        meta_path = os.path.join(self.path, META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{self.path!r} is not an embedding store (no {META}); encode the texts first "
                                    f"(embedder.retrieval.encode.encode_to_stores) or check the path")
        self.meta: dict[str, Any] = read_json(meta_path, "embedding-store metadata",
                                              f"delete the folder {self.path}; the next run encodes it again")
        if self.meta.get("format") != FORMAT:
            raise StoreMismatch(f"{meta_path}: unsupported store format {self.meta.get('format')!r} "
                                f"(expected {FORMAT})")

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str, num_rows: int, shard_size: int, fingerprint: str,
               info: dict[str, Any] | None = None) -> EmbeddingStore:
        """Open the store at `path`, creating its `meta.json` when the folder is new.

        An existing store is reused (its finished shards count as done) only when `num_rows`, `shard_size` and
        `fingerprint` all match; otherwise `StoreMismatch` says what differs.
        """
        if num_rows < 1:
            raise ValueError(f"nothing to encode: num_rows={num_rows}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        meta_path = os.path.join(path, META)
        if os.path.isfile(meta_path):
            store = cls(path)
            want = {"num_rows": int(num_rows), "shard_size": int(shard_size), "fingerprint": fingerprint}
            diff = {k: (store.meta.get(k), v) for k, v in want.items() if store.meta.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in diff.items())
                raise StoreMismatch(f"{path!r} already holds embeddings of other texts or another encoder ({detail}); "
                                    f"delete the folder or choose another output_dir")
            return store
        os.makedirs(path, exist_ok=True)
        write_json(meta_path, {"format": FORMAT, "num_rows": int(num_rows), "shard_size": int(shard_size),
                                 "num_shards": math.ceil(num_rows / shard_size), "dim": None,
                                 "fingerprint": fingerprint, "info": dict(info or {})})
        return cls(path)

    # ------------------------------------------------------------------ layout
    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    @property
    def num_shards(self) -> int:
        return int(self.meta["num_shards"])

    def shard_rows(self, s: int) -> range:
        """The corpus rows held by shard `s`."""
        if not 0 <= s < self.num_shards:
            raise IndexError(f"shard {s} out of range (the store has {self.num_shards})")
        return range(s * self.shard_size, min((s + 1) * self.shard_size, self.num_rows))

    def shard_path(self, s: int) -> str:
        return os.path.join(self.path, _shard_name(s))

    def done_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if os.path.isfile(self.shard_path(s))]

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not os.path.isfile(self.shard_path(s))]

    def is_complete(self) -> bool:
        return not self.missing_shards()

    # ------------------------------------------------------------------ I/O
    def write_shard(self, s: int, embeddings: np.ndarray) -> None:
        """Write shard `s` (its rows' embeddings, (n, D)) atomically: temp file in the same folder, then rename."""
        rows = self.shard_rows(s)
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(rows):
            raise ValueError(f"shard {s} holds {len(rows)} rows, got embeddings of shape {emb.shape}")
        with atomic_open(self.shard_path(s), suffix=".npy", binary=True) as f:
            np.save(f, emb)

    def read_shard(self, s: int, mmap: bool = False) -> np.ndarray:
        """Shard `s` as a (n, D) float32 array (memory-mapped when `mmap`)."""
        path = self.shard_path(s)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} is missing: the store is incomplete; rerun the same command and "
                                    f"only the missing shards are encoded")
        arr = np.load(path, mmap_mode="r" if mmap else None)
        if arr.shape[0] != len(self.shard_rows(s)):
            raise StoreMismatch(f"{path!r} has {arr.shape[0]} rows, expected {len(self.shard_rows(s))}")
        return arr

    def iter_shards(self, mmap: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """`(first row, (n, D) embeddings)` for every shard, in row order."""
        for s in range(self.num_shards):
            yield s * self.shard_size, self.read_shard(s, mmap=mmap)

    def load(self, mmap: bool = False) -> np.ndarray:
        """All rows as one (N, D) float32 array. Raises if a shard is missing."""
        missing = self.missing_shards()
        if missing:
            raise FileNotFoundError(f"embedding store {self.path!r} is incomplete: {len(missing)} of "
                                    f"{self.num_shards} shards missing (first: {missing[:5]}); rerun the encoding "
                                    f"command and only the missing shards are encoded")
        parts = [a for _, a in self.iter_shards(mmap=mmap)]
        return np.concatenate(parts, axis=0) if len(parts) > 1 else np.asarray(parts[0], dtype=np.float32)


def load_encode(path: str, mmap: bool = False) -> np.ndarray:
    """Embeddings saved by `encode_to_stores` (any number of devices), as one (N, D) float32 array.

    Example:
        >>> emb = load_encode("outputs/mine/encode/corpus-minilm-1a2b3c")  # (N, 384)  # doctest: +SKIP
    """
    return EmbeddingStore(path).load(mmap=mmap)
