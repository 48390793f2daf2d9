"""Cached row indexes (byte offsets, validation counts) for large input files, shared by all ranks of a node.

Reading a 16 GB training file or a 54M-line corpus once to validate it and find where each record starts takes
minutes. The result (an int64 offset per kept record plus a small JSON of counts) is cached under
`$EMBEDDER_CACHE` (default `~/.cache/embedder`), keyed by the file's path, size and modification time and by
everything that changes the result. Reruns, resumed runs and the other ranks then memory-map the offsets instead
of reading the file again: the OS page cache holds one copy per node.

Writes are atomic (the arrays first, the JSON last; only a complete entry is ever read), so ranks that build the
same entry at once are harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from embedder.atomic import atomic_open, write_json

log = logging.getLogger(__name__)

VERSION = 1  # bump when the validation rules change, so stale entries are not trusted
_unwritable: set[str] = set()  # cache folders that could not be written (warned once each)


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("EMBEDDER_CACHE") or os.path.join("~", ".cache", "embedder"))


def untrained_stores_dir() -> str:
    """Where embedding stores of weights that are not being trained are kept across runs: the untrained encoder's
    evaluation stores, and the corpus store of a recipe's dense mining with that same encoder (one encoding for
    both)."""
    return os.path.join(cache_root(), "eval-encode")


def file_identity(path: str) -> dict[str, Any]:
    """What identifies a file's content cheaply: its real path, size and modification time (ns)."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_index(kind: str, key: dict[str, Any], build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
                 use_cache: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`(arrays, meta)` for `key`: loaded (arrays memory-mapped, read-only) if cached, else built and cached.

    `build()` returns the arrays (1-D numpy) and a JSON-serialisable meta dict. If the cache folder cannot be
    written (read-only home, full disk), the built result is used without caching.
    """
    digest = hashlib.blake2b(json.dumps({"v": VERSION, "kind": kind, **key}, sort_keys=True, default=str).encode(),
                             digest_size=16).hexdigest()
    folder = os.path.join(cache_root(), kind)
    meta_path = os.path.join(folder, f"{digest}.json")
    if use_cache and os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            arrays = {name: _load(os.path.join(folder, f"{digest}.{name}.npy")) for name in meta["_arrays"]}
            return arrays, meta
        except (OSError, ValueError, KeyError, EOFError):
            log.warning("ignoring a damaged index cache entry %s; rebuilding it", meta_path)
    arrays, meta = build()
    meta = {**meta, "_arrays": sorted(arrays), "_key": key}
    if use_cache:
        try:
            os.makedirs(folder, exist_ok=True)
            for name, arr in arrays.items():
                with atomic_open(os.path.join(folder, f"{digest}.{name}.npy"), suffix=".npy", binary=True) as f:
                    np.save(f, np.ascontiguousarray(arr))
            write_json(meta_path, meta, indent=None)  # last: an entry with its meta is complete
        except OSError as e:
            if folder not in _unwritable:  # once per folder: the token cache asks once per chunk
                _unwritable.add(folder)
                what = "token ids" if kind == "tokens" else f"the index of {key.get('file', {}).get('path', kind)}"
                log.warning("could not cache %s under %s (%s); continuing without the cache", what, folder, e)
    return arrays, meta


def _load(path: str) -> np.ndarray:
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array")
    return arr
