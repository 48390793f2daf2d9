"""Length-sorted batches of tokenised texts for encoding: the one batching of every encode path.

`encode_to_stores` (mining, standalone evaluation), `encode_in_lockstep` (in-training evaluation) and
`DualEncoder.encode_texts` (rerank sets, small in-process encodes) all cut their texts the same way:

1. `tokenize_compact`: token ids as one int32 array per text, tokenised in chunks (the fast tokenizer's per-text
   objects and Python int lists cost ~20x the ids); `cached_tokens` keeps them on disk (`$EMBEDDER_CACHE/tokens`,
   through the one array cache, `cached_index`), so encoding the same texts again (every in-training evaluation,
   before and after training, each mining round) reads ids instead of tokenising: one process tokenises ~3k
   MS MARCO passages/s, while a bert-base forward on an H200 encodes ~18k/s;
2. `sorted_batches`: rows sorted longest first, cut into `batch_size` rows or, with `batch_tokens`, into as many
   rows as fit that many padded tokens (rows x the batch's longest), so short texts go in large batches and long
   ones in small, and the work per forward pass is even;
3. `pad_batch`: one (n, L) batch padded to its own longest row, built with array operations (no per-row Python
   loop: that loop was host work on every batch of a GPU encode).

Hand-written because no library does length-sorted token-budget batching over pre-tokenised arrays: datasets'
`map(batched=True)` and transformers' collators pad fixed row counts.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from embedder.data.index_cache import cached_index

TOKENIZE_CHUNK = 4096  # texts tokenised at once (bounds the tokenizer's transient memory)
# `batch_tokens=auto`: the token budget per batch on each device. On an H200 a bert-base forward wants large
# batches (32,768 tokens: ~350 MS MARCO passages). On a CPU large batches are slower: MiniLM, 2 cores, 1,000
# MS MARCO-like passages: 4,096 tokens ~80-90 passages/s, 32,768 ~55-63/s, 64 texts per batch ~66-83/s,
# sentence-transformers (64 texts) ~70-77/s (docs/benchmarks.md).
GPU_BATCH_TOKENS = 32768
CPU_BATCH_TOKENS = 4096


def tokenize_compact(tokenizer: Any, texts: Sequence[str], max_length: int, rows: range | None = None,
                     chunk: int = TOKENIZE_CHUNK) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Token ids (and token type ids, where the tokenizer makes them) of `texts[rows]` (all by default), truncated to
    `max_length`, as one int32 array per text. Texts are read `chunk` at a time, so a corpus read on access never
    holds more than a chunk of strings."""
    rows = range(len(texts)) if rows is None else rows
    ids: list[np.ndarray] = []
    types: list[np.ndarray] | None = None
    for c in range(0, len(rows), chunk):
        part = rows[c:c + chunk]
        batch = texts[part.start:part.stop] if part.step == 1 else [texts[r] for r in part]
        tok = tokenizer(list(batch), truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False)
        ids.extend(np.asarray(x, dtype=np.int32) for x in tok["input_ids"])
        if tok.get("token_type_ids") is not None:
            types = [] if types is None else types
            types.extend(np.asarray(x, dtype=np.int32) for x in tok["token_type_ids"])
    return ids, types


def token_cache_key(tokenizer: Any, texts_fp: str, max_length: int) -> dict[str, Any] | None:
    """What determines the token ids of some texts: their fingerprint (`texts_fingerprint`), the tokenizer (a hash
    of its whole serialised pipeline: normaliser, pre-tokeniser, vocabulary, post-processor) and the truncation.
    None for a tokenizer without a serialisable backend (a slow, Python tokenizer): its ids are not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pipeline = _pipeline_hash(tokenizer, backend)
    return {"texts": texts_fp, "tokenizer": pipeline, "class": type(tokenizer).__name__,
            "max_length": int(max_length), "truncation_side": getattr(tokenizer, "truncation_side", "right")}


_PIPELINE_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pipeline_hash(tokenizer: Any, backend: Any) -> str:
    """A hash of the tokenizer's serialised pipeline, kept per tokenizer object and vocabulary size (hashing a
    30k-word vocabulary takes ~0.2 s, and in-training evaluation asks at every evaluation)."""
    size = len(tokenizer)  # tokens added later change the size
    known = _PIPELINE_HASHES.get(backend)
    if known is not None and known[0] == size:
        return known[1]
    # the serialised state also holds the truncation and padding of the last call, which `tokenize_compact` sets
    state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    digest = hashlib.blake2b(json.dumps(state, sort_keys=True).encode(), digest_size=16).hexdigest()
    _PIPELINE_HASHES[backend] = (size, digest)
    return digest


def cached_tokens(tokenizer: Any, texts: Sequence[str], max_length: int, rows: range,
                  key: dict[str, Any] | None) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """`tokenize_compact(..., rows=rows)`, read from the token cache when `key` (from `token_cache_key`) has an
    entry for these rows, else tokenised and cached (ids as uint16 where the vocabulary fits, offsets, and token
    types as uint8 unless all zero; written atomically, memory-mapped on reading). Without a key, tokenised every
    time."""
    if key is None:
        return tokenize_compact(tokenizer, texts, max_length, rows=rows)

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        ids, types = tokenize_compact(tokenizer, texts, max_length, rows=rows)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)  # (n+1,) row i is flat[offsets[i]:offsets[i+1]]
        np.cumsum(token_lengths(ids), out=offsets[1:])
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        small = flat.size == 0 or (flat.min() >= 0 and flat.max() < 2 ** 16)
        arrays = {"ids": flat.astype(np.uint16 if small else np.int32), "offsets": offsets}
        all_types = None if types is None else np.concatenate(types) if types else np.zeros(0, np.int32)
        if all_types is not None and all_types.any():  # single texts have all-zero types: not stored
            arrays["types"] = all_types.astype(np.uint8)
        return arrays, {"rows": len(ids), "types": None if all_types is None else "stored" if "types" in arrays
                        else "zeros"}

    arrays, meta = cached_index("tokens", {**key, "rows": [rows.start, rows.stop, rows.step]}, build)
    off = np.asarray(arrays["offsets"])
    split = [(int(a), int(b)) for a, b in zip(off[:-1], off[1:])]
    ids = [arrays["ids"][a:b] for a, b in split]  # views of the memory-mapped file
    types = None
    if meta.get("types") == "stored":
        types = [arrays["types"][a:b] for a, b in split]
    elif meta.get("types") == "zeros":
        zeros = np.zeros(int(off[-1]), np.uint8)  # one array; each row a view of it
        types = [zeros[a:b] for a, b in split]
    return ids, types


def token_lengths(ids: Sequence[np.ndarray]) -> np.ndarray:
    """(n,) int64 token count of each row."""
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def resolve_batch_tokens(batch_tokens: int | str | None, device: torch.device | str) -> int:
    """The token budget per batch: `auto` (or None) is GPU_BATCH_TOKENS on CUDA and CPU_BATCH_TOKENS elsewhere;
    0 means `batch_size` texts per batch."""
    if batch_tokens is None or str(batch_tokens).lower() == "auto":
        return GPU_BATCH_TOKENS if torch.device(device).type == "cuda" else CPU_BATCH_TOKENS
    try:
        value = int(batch_tokens)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"batch_tokens={batch_tokens!r}; valid: auto, 0 (batch_size texts) or a token count")
    return value


def sorted_batches(lengths: np.ndarray, batch_size: int, batch_tokens: int = 0) -> Iterator[np.ndarray]:
    """Row positions of each batch, longest rows first (ties keep row order): `batch_size` rows each, or with
    `batch_tokens` as many rows as fit that many padded tokens (32-token texts fill 65,536 with 2,048 rows)."""
    order = np.argsort(-lengths, kind="stable")
    if not batch_tokens:
        for b in range(0, len(order), batch_size):
            yield order[b:b + batch_size]
        return
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])  # longest first: the first row sets the batch's width
        n = max(1, int(batch_tokens) // max(1, width))
        yield order[start:start + n]
        start += n


def pad_batch(ids: Sequence[np.ndarray], types: Sequence[np.ndarray] | None, pos: np.ndarray, pad_id: int,
              left: bool = False) -> dict[str, torch.Tensor]:
    """The rows `pos` of `ids` as one padded batch: `input_ids`, `attention_mask` (and `token_type_ids`), each
    (n, L) int64 with L the longest row; padded on the right, or on the left for a left-padding tokenizer."""
    lengths = np.fromiter((len(ids[p]) for p in pos), dtype=np.int64, count=len(pos))  # (n,)
    width = int(lengths.max()) if len(pos) else 0
    cols = np.arange(width)[None, :]  # (1, L)
    real = cols >= (width - lengths)[:, None] if left else cols < lengths[:, None]  # (n, L) real tokens
    # boolean assignment fills the True slots row by row, left to right: the rows' tokens in order
    input_ids = np.full((len(pos), width), pad_id, dtype=np.int64)  # (n, L)
    input_ids[real] = np.concatenate([ids[p] for p in pos]) if len(pos) else []
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if types is not None:
        tt = np.zeros((len(pos), width), dtype=np.int64)  # (n, L)
        tt[real] = np.concatenate([types[p] for p in pos])
        batch["token_type_ids"] = torch.from_numpy(tt)
    return batch


def pad_id_of(tokenizer: Any) -> tuple[int, bool]:
    """(the tokenizer's pad id, or 0 without one; whether it pads on the left)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return int(pad), getattr(tokenizer, "padding_side", "right") == "left"
