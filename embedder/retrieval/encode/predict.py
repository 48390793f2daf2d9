"""Encode texts into `EmbeddingStore`s with Lightning's predict loop: any device, any number of them, resumable.

How the work is cut:

- Every job (a corpus, a query set) is cut into fixed row-range shards (`EmbeddingStore`). The shards still missing
  on disk are dealt round-robin to the ranks: unit `u` goes to rank `u % world_size`. No rank pads or duplicates
  rows (Lightning's `DistributedSampler` would), and a rerun after a crash only encodes the missing shards.
- Inside a shard, texts are tokenised once, sorted by token length (longest first) and cut into batches, so a
  batch pads to its own longest text and almost no compute goes to padding. Batches depend only on the shard's
  texts, never on the rank or the world size, so 1 or 8 devices produce bit-identical embeddings.
- The model runs in its dtype: `dtype="auto"` is bf16 on a GPU that supports it and fp32 on CPU.
- Lightning shows its progress bar ("Predicting DataLoader 0: n/N" batches on each rank).

One `trainer.predict` call encodes all jobs (queries and corpus together), so a `ddp_spawn` run starts its worker
processes once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from embedder import stopping
from embedder.atomic import write_json
from embedder.data.corpus import texts_fingerprint
from embedder.data.encode_batches import (
    cached_tokens,
    pad_batch,
    pad_id_of,
    resolve_batch_tokens,
    sorted_batches,
    token_cache_key,
    token_lengths,
)
from embedder.data.workers import ENCODE_MAX_WORKERS, resolve_num_workers, trainer_num_workers
from embedder.dtypes import resolve_dtype
from embedder.modeling.unpadded import say_once
from embedder.progress import Progress
from embedder.retrieval.encode.store import META, EmbeddingStore

log = logging.getLogger(__name__)
# our IterableDataset gives each DataLoader worker its own slice of every shard and counts the batches of
# those slices, so its __len__ is exact
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")


@dataclass
class EncodeJob:
    """One list of texts to encode into one store.

    Attributes:
        name: shown in logs ("corpus", "queries", ...).
        texts: the exact model inputs (instruction already prepended).
        store_path: the store folder; finished shards found there are kept.
        kind: "query" or "key": which encoder of an untied DualEncoder.
        max_length: token limit (longer texts are truncated).
        shard_size: rows per shard: the unit of resume and of work across devices.
        identity: what else determines the embeddings (model path, pooling, ...); part of the fingerprint.
    """

    name: str
    texts: Sequence[str]
    store_path: str
    kind: str = "key"
    max_length: int = 256
    shard_size: int = 100_000
    identity: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def texts_fingerprint(self) -> str:
        """A hash of the texts (a corpus answers from its cached fingerprint), computed once per job: the store's
        fingerprint and the token cache's key both use it."""
        return texts_fingerprint(self.texts)

    def fingerprint(self) -> str:
        """A hash of the texts, the kind, the length limit and `identity`."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({"kind": self.kind, "max_length": self.max_length, **self.identity}, sort_keys=True,
                            default=str).encode())
        h.update(self.texts_fingerprint.encode())
        return h.hexdigest()


def encoder_identity(encoder: Any) -> dict[str, Any] | None:
    """What determines a DualEncoder's embeddings besides its inputs (used in store fingerprints): its settings and
    a hash of every parameter and buffer, so an encoder fine-tuned in memory never matches a store of its old
    weights. None when the weights cannot be read whole on this rank (DeepSpeed ZeRO-3 partitions them)."""
    ident = {"model": getattr(encoder, "model_name_or_path", type(encoder).__name__),
             "pooling": getattr(encoder, "pooling", None), "normalize": getattr(encoder, "normalize", None),
             "dense": getattr(encoder, "dense", None) is not None,
             **({"truncate_dim": encoder.truncate_dim} if getattr(encoder, "truncate_dim", None) else {})}
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, t in list(encoder.named_parameters()) + list(encoder.named_buffers()):
            if hasattr(t, "ds_id"):  # a ZeRO-3 partition: this rank holds only a slice
                return None
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    ident["weights"] = h.hexdigest()
    return ident


TOKEN_CHUNK = 16_384  # rows per tokenised chunk: the unit of the token cache and of work among DataLoader workers


class _BatchStream(IterableDataset):
    """Yields padded, length-sorted batches, shard by shard, for this rank's (job, shard) units.

    Each shard is cut into chunks of TOKEN_CHUNK rows, and the chunks of all units are dealt round-robin to the
    DataLoader's workers (one worker without them), so W workers tokenise W chunks at once (tokenisation, not the
    GPU, bounded encoding: 3.1k passages/s for one tokenising process vs 18k/s for the bert-base forward on an H200).
    A worker sorts the rows of its chunks of one shard by length and cuts them into batches; ShardWriter puts rows
    back by position, whichever worker's batch they come in. `token_keys[j]` (from `token_cache_key`) caches job j's
    token ids on disk, so encoding the same texts again skips tokenising; None tokenises every time.
    """

    def __init__(self, units: list[tuple[int, int]], jobs: list[EncodeJob], shard_rows: list[list[range]],
                 tokenizer: Any, batch_size: int, batch_tokens: int = 0, num_workers: int = 0,
                 token_keys: list[dict[str, Any] | None] | None = None):
        self.units, self.jobs, self.shard_rows = units, jobs, shard_rows
        self.tokenizer, self.batch_size, self.batch_tokens = tokenizer, batch_size, int(batch_tokens)
        self.num_workers = max(1, int(num_workers))  # the DataLoader's workers: each takes every W-th chunk
        self.token_keys = token_keys or [None] * len(jobs)

    @property
    def num_texts(self) -> int:
        """The texts this stream encodes (all its workers together): what progress counts, as the number of
        token-budget batches is not known in advance."""
        return sum(len(self.shard_rows[j][s]) for j, s in self.units)

    def _work(self, w: int, nw: int) -> list[tuple[int, int, list[range]]]:
        """Worker w's (job, shard, chunks) of every unit, in unit order: every nw-th chunk of all units."""
        out: list[tuple[int, int, list[range]]] = []
        i = 0
        for j, s in self.units:
            rows = self.shard_rows[j][s]
            for c in range(0, len(rows), TOKEN_CHUNK):
                if i % nw == w:
                    if out and out[-1][:2] == (j, s):
                        out[-1][2].append(rows[c:c + TOKEN_CHUNK])
                    else:
                        out.append((j, s, [rows[c:c + TOKEN_CHUNK]]))
                i += 1
        return out

    def __len__(self) -> int:
        if self.batch_tokens:  # batch boundaries depend on token counts, known once a shard is tokenised
            raise TypeError("token-budget batches have no length before tokenisation")
        nw = self.num_workers
        return sum(math.ceil(sum(len(r) for r in chunks) / self.batch_size)
                   for w in range(nw) for _, _, chunks in self._work(w, nw))

    def __iter__(self):
        info = get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        pad_id, left = pad_id_of(self.tokenizer)
        for j, s, chunks in self._work(w, nw):
            job, start = self.jobs[j], self.shard_rows[j][s].start
            ids: list[np.ndarray] = []
            types: list[np.ndarray] | None = None
            for rows in chunks:
                chunk_ids, chunk_types = cached_tokens(self.tokenizer, job.texts, job.max_length, rows,
                                                       self.token_keys[j])
                ids += chunk_ids
                types = None if chunk_types is None else (types or []) + chunk_types
            positions = np.concatenate([np.arange(r.start - start, r.stop - start) for r in chunks])  # in the shard
            for pos in sorted_batches(token_lengths(ids), self.batch_size, self.batch_tokens):
                batch = pad_batch(ids, types, pos, pad_id, left)
                batch.update(positions=torch.from_numpy(positions[pos]), job=j, shard=s,
                             rows=len(self.shard_rows[j][s]))
                yield batch


class EncodeDataModule(L.LightningDataModule):
    """Deals the missing shards of all jobs to the ranks, when Lightning asks each rank for its dataloader."""

    def __init__(self, jobs: list[EncodeJob], tokenizer: Any, batch_size: int = 128, num_workers: int | str = "auto",
                 batch_tokens: int | str = 0, token_cache: bool = True):
        super().__init__()
        self.jobs, self.tokenizer = jobs, tokenizer
        self.batch_size, self.num_workers, self.batch_tokens = int(batch_size), num_workers, batch_tokens
        self.token_cache = bool(token_cache)

    def pending_units(self) -> list[tuple[int, int]]:
        return [(j, s) for j, job in enumerate(self.jobs) for s in EmbeddingStore(job.store_path).missing_shards()]

    def predict_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        units = self.pending_units()[rank::world]
        shard_rows = []
        for job in self.jobs:
            store = EmbeddingStore(job.store_path)
            shard_rows.append([store.shard_rows(s) for s in range(store.num_shards)])
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        batch_tokens = resolve_batch_tokens(self.batch_tokens, device)
        workers = trainer_num_workers(self.num_workers, self.trainer, ENCODE_MAX_WORKERS)
        stream = _BatchStream(units, self.jobs, shard_rows, self.tokenizer, self.batch_size, batch_tokens,
                              workers, token_keys(self.tokenizer, self.jobs, self.token_cache))
        log.info("rank %d/%d encodes %d shard(s) in %s", rank, world, len(units),
                 f"batches of up to {batch_tokens} tokens" if batch_tokens else f"{len(stream)} batches")
        # workers tokenise the next shard while the model runs; pinned host memory lets Lightning copy each batch
        # to the GPU without blocking (it passes non_blocking=True for CUDA)
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False, prefetch_factor=4 if workers else None)


class ShardWriter:
    """Collects a shard's embeddings batch by batch (batches come length-sorted) and writes the shard, atomically,
    as soon as all of its rows are in. The one place where encoded batches become store shards."""

    def __init__(self, store_paths: list[str]):
        self.stores = [EmbeddingStore(p) for p in store_paths]
        self.pending: dict[tuple[int, int], list] = {}

    def add(self, batch: dict[str, Any], emb: np.ndarray) -> None:
        j, s, n = int(batch["job"]), int(batch["shard"]), int(batch["rows"])
        key = (j, s)
        if key not in self.pending:
            self.pending[key] = [np.empty((n, emb.shape[1]), dtype=np.float32), 0]
        buf = self.pending[key]
        buf[0][batch["positions"].cpu().numpy()] = emb
        buf[1] += emb.shape[0]
        if buf[1] == n:  # the shard is complete: write it (atomically) and free the buffer
            self.stores[j].write_shard(s, buf[0])
            del self.pending[key]

    def check_done(self) -> None:
        if self.pending:  # every unit is complete when the loop ends normally
            raise RuntimeError(f"encoding ended with incomplete shards {sorted(self.pending)}")


def model_inputs(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors of a batch, copied to `device` (without blocking where the batch is in pinned memory)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return inputs if device is None else {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


class EncodeModule(L.LightningModule):
    """Runs the encoder on each batch and writes a shard as soon as all of its rows are encoded."""

    def __init__(self, encoder: torch.nn.Module, jobs: list[EncodeJob], dtype: str = "auto"):
        super().__init__()
        self.encoder = encoder
        self.store_paths = [job.store_path for job in jobs]
        self.kinds = [job.kind for job in jobs]
        self.dtype_name = dtype
        self._writer: ShardWriter | None = None
        self._orig_dtype: torch.dtype | None = None
        self._was_training = False

    def on_predict_start(self) -> None:
        self._writer = ShardWriter(self.store_paths)
        self._was_training = self.encoder.training
        self._orig_dtype = next(self.encoder.parameters()).dtype
        dtype = resolve_dtype(self.dtype_name, self.device)
        if dtype is not None and dtype != self._orig_dtype:
            self.encoder.to(dtype)
        self.encoder.eval()
        log.info("encoding on %s in %s", self.device, next(self.encoder.parameters()).dtype)

    def on_predict_end(self) -> None:
        if self._orig_dtype is not None and next(self.encoder.parameters()).dtype != self._orig_dtype:
            self.encoder.to(self._orig_dtype)  # leave the caller's encoder as it was
        self.encoder.train(self._was_training)
        self._writer.check_done()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> int:
        stopping.check("encoding")  # between batches: finished shards stay and are reused
        emb = self.encoder.encode(model_inputs(batch), self.kinds[int(batch["job"])]).float().cpu().numpy()  # (b, D)
        self._writer.add(batch, emb)
        return emb.shape[0]  # not collected (return_predictions=False); None would make Lightning warn


def token_keys(tokenizer: Any, jobs: list[EncodeJob], token_cache: bool = True) -> list[dict[str, Any] | None]:
    """Each job's token-cache key (`token_cache_key`), or None for every job when the cache is off."""
    return [token_cache_key(tokenizer, job.texts_fingerprint, job.max_length) if token_cache else None for job in jobs]


def zero3_partitioned(encoder: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the encoder's parameters (each forward then gathers them: a collective)."""
    return any(hasattr(p, "ds_id") for p in encoder.parameters())


@torch.no_grad()
def encode_in_lockstep(encoder: torch.nn.Module, jobs: list[EncodeJob], units_per_rank: list[list[tuple[int, int]]],
                       rank: int, batch_size: int = 128, batch_tokens: int | str = 0, num_workers: int | str = "auto",
                       token_cache: bool = True) -> None:
    """Encode this rank's `(job, shard)` units in this process, with the batches of `encode_to_stores`.

    For a loop that is already running on every rank (a fit's validation), where Lightning's predict loop cannot
    start. `num_workers` DataLoader workers tokenise slices of each shard while the model runs, as in
    `encode_to_stores`. Under DeepSpeed ZeRO-3 each forward gathers the parameters (a collective), so every rank must
    run the same number of forward passes per job: batches are then `batch_size` texts, whose count is known before
    tokenising, a rank with fewer pads with one-text batches, and jobs run one after the other (an untied encoder's
    query and key models are gathered separately). Elsewhere a forward has no collective, and batches fill
    `batch_tokens`. `token_cache`: read the texts' token ids from the token cache, caching them the first time.
    """
    device = next(encoder.parameters()).device
    batch_tokens = resolve_batch_tokens(batch_tokens, device)
    num_workers = resolve_num_workers(num_workers, device.type == "cuda", cap=ENCODE_MAX_WORKERS)
    zero3 = zero3_partitioned(encoder)
    if zero3 and batch_tokens:
        say_once("lockstep-zero3", "ZeRO-3: in-training evaluation encodes batches of %d texts, not of %d tokens (every "
                 "rank must run the same number of forward passes)", batch_size, batch_tokens)
        batch_tokens = 0
    writer = ShardWriter([job.store_path for job in jobs])
    keys = token_keys(encoder.tokenizer, jobs, token_cache)
    was_training = encoder.training
    encoder.eval()
    for j, job in enumerate(jobs):
        store = EmbeddingStore(job.store_path)
        shard_rows = [[store.shard_rows(s) for s in range(store.num_shards)] if i == j else []
                      for i in range(len(jobs))]

        def stream(units: list[tuple[int, int]]) -> _BatchStream:
            return _BatchStream([u for u in units if u[0] == j], jobs, shard_rows, encoder.tokenizer, batch_size,
                                batch_tokens, num_workers, keys)

        mine = stream(units_per_rank[rank])
        batches: Any = mine if not num_workers else DataLoader(
            mine, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda", prefetch_factor=4)
        # progress with an ETA in logs too (nohup, SLURM): in-training evaluation of a large corpus takes a while
        progress = Progress(f"encoding {job.name} (rank {rank})", mine.num_texts, unit="texts", logger=log)
        done = 0
        for batch in batches:
            stopping.check(f"encoding {job.name}")  # between batches: finished shards stay and are reused
            emb = encoder.encode(model_inputs(batch, device), job.kind).float().cpu().numpy()  # (b, D)
            writer.add(batch, emb)
            progress.update(len(emb))
            done += 1
        progress.finish()
        if zero3:  # keep in step with the ranks that have more batches
            target = max(len(stream(units)) for units in units_per_rank)
            pad = {k: v.to(device) for k, v in encoder.tokenizer([""], return_tensors="pt").items()}
            for _ in range(target - done):
                encoder.encode(pad, job.kind)
    writer.check_done()
    encoder.train(was_training)


def make_predict_trainer(trainer_cfg: Any = None, **overrides: Any) -> L.Trainer:
    """A Trainer for encoding from a `trainer:` config (the same group as training: cpu, gpu, ddp, ddp_sim, ...).

    Logging, checkpointing and the model summary are switched off; the progress bar stays on, and `LogProgress`
    logs a line with an ETA every 30 s where the bar cannot draw (nohup, SLURM).
    """
    from embedder.callbacks import LogProgress

    kwargs: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                              "callbacks": [LogProgress()]}
    kwargs.update(overrides)
    if trainer_cfg is None:
        return L.Trainer(**{"accelerator": "auto", "devices": 1, **kwargs})
    import hydra

    return hydra.utils.instantiate(trainer_cfg, **kwargs)


def encode_to_stores(encoder: torch.nn.Module, jobs: list[EncodeJob], trainer: L.Trainer | None = None,
                     batch_size: int = 128, dtype: str = "auto", num_workers: int | str = "auto",
                     batch_tokens: int | str = 0, token_cache: bool = True) -> list[EmbeddingStore] | None:
    """Encode every job into its store (resuming finished shards); returns the stores on global rank 0.

    Other ranks of a `ddp` (non-spawn) run get None once all shards are written: they have nothing left to do.

    Example:
        >>> jobs = [EncodeJob("corpus", texts, "enc/corpus", kind="key", max_length=256)]      # doctest: +SKIP
        >>> (store,) = encode_to_stores(encoder, jobs, make_predict_trainer(cfg.trainer))     # doctest: +SKIP
        >>> emb = store.load()   # (N, D) float32                                             # doctest: +SKIP
    """
    trainer = trainer or make_predict_trainer()
    for job in jobs:
        if len(job.texts) == 0:
            raise ValueError(f"encode job {job.name!r} has no texts")
        # every rank opens (or creates) the store: meta.json is written atomically and is identical on all ranks,
        # and all ranks see the same missing shards, so they agree on whether there is anything to encode
        store = EmbeddingStore.create(job.store_path, len(job.texts), job.shard_size, job.fingerprint(),
                                      info={"name": job.name, "kind": job.kind, "max_length": job.max_length})
        done = len(store.done_shards())
        if done and trainer.is_global_zero:
            log.info("%s: %d of %d shard(s) already encoded in %s; encoding the rest", job.name, done,
                     store.num_shards, job.store_path)
    datamodule = EncodeDataModule(jobs, encoder.tokenizer, batch_size=batch_size, num_workers=num_workers,
                                  batch_tokens=batch_tokens, token_cache=token_cache)
    if not datamodule.pending_units():
        log.info("every shard is already encoded; nothing to do")
    else:
        module = EncodeModule(encoder, jobs, dtype=dtype)
        device = next(encoder.parameters()).device
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        trainer.strategy.barrier()  # every rank's shards are on disk before rank 0 reads them
        if next(encoder.parameters()).device != device:  # Lightning's teardown moves the model to the CPU
            encoder.to(device)
    if not trainer.is_global_zero:
        return None
    stores = [EmbeddingStore(job.store_path) for job in jobs]
    for store in stores:
        if not store.is_complete():
            raise RuntimeError(f"encoding finished but {store.path!r} still misses shards {store.missing_shards()[:5]}")
        if store.meta.get("dim") is None:  # record the dimension once, now that a shard exists
            store.meta["dim"] = int(store.read_shard(0, mmap=True).shape[1])
            write_json(os.path.join(store.path, META), store.meta)
    return stores
