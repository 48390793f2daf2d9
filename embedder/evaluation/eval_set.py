"""An evaluation set from config (eval file + corpus + the task whose instructions encode them), evaluated during
training through the same encoding stores, faiss index and scoring as standalone evaluation and mining.

How a retrieval eval set is evaluated on W ranks (W = 1 outside a process group):

The search is `embedder.retrieval.dense.sharded_search` (the package's one encode -> index -> search path, in its
per-rank strategy):

1. The corpus and the queries become `EncodeJob`s over `EmbeddingStore`s (fixed row-range shards on disk). Shard s
   belongs to rank `s % W`: each rank encodes only its missing shards, with `encode_to_stores`' batching (so 1 or 8
   ranks give bit-identical embeddings), and every rank runs the same number of forward passes (ZeRO-3).
2. Each rank builds one faiss index (`index_factory`) over its own corpus shards, memory-mapped from disk, and
   searches every query: no rank holds more than its 1/W of the corpus embeddings. The per-rank top-k lists are
   gathered and merged (`merge_topk`; equal scores rank by id, so any W gives the one-index ranking).
3. The rankings are scored by the `RetrievalEvaluator` (label metrics, answer recall).

The stores of the untrained encoder are cached under `$EMBEDDER_CACHE/eval-encode`, keyed by a hash of its weights,
the texts, the instruction and the length limit: `evaluate_before` costs one corpus encode per model, not one per run.
Stores of trained weights go to `work_dir/eval-encode/<hash of the weights>` (`step-<n>` under ZeRO-3, whose
partitioned weights cannot be hashed on one rank). What each evaluation costs is what it must:

- eval sets that share a corpus, key template, instruction and length limit (a BEIR folder's dev and test) share
  one corpus encoding per set of weights: the second set finds the first one's stores complete;
- the stores of the latest trained weights are kept until the next validation (`keep_stores`) and deleted at the
  end of the run (`release_trained_stores`), so evaluating the final state again after training (`after`, the
  export's numbers) encodes nothing; with `keep_stores: false` (a 54M-passage corpus) they go after each validation;
- a set evaluated twice with the same weights returns its first metrics (no search, no scoring);
- a set with `during_fit: false` (a test split) is evaluated before and after training, never for selection.

A rerank set (`mode: rerank`) scores each record's own candidates and needs no corpus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from embedder.data.corpus import open_corpus, prefixed
from embedder.data.index_cache import cache_root, untrained_stores_dir
from embedder.data.jsonl import iter_jsonl
from embedder.data.kinds import Instruction, RecordKind
from embedder.distributed import barrier as _barrier
from embedder.distributed import is_distributed, rank, world_size
from embedder.evaluation.retrieval import MODES, RetrievalEvaluator
from embedder.paths import resolve_files
from embedder.retrieval.dense import sharded_search
from embedder.retrieval.encode.predict import encoder_identity

log = logging.getLogger(__name__)

TRAINED_STORES = "eval-encode"  # work_dir/<this>: the stores of trained weights, deleted at the end of the run


def _all_gather(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class EvalSet:
    """Reads and checks the files once; `evaluate(encoder)` encodes with the encoder's current weights and scores.

    Args:
        name: logs as `val/<name>/<metric>@k`.
        eval_data, corpus: files (`llm-embedder:` paths resolve against `data_root`); the corpus may be JSON lines,
            a parquet file or a folder of parquet shards, and is read on access.
        instruction: the task's query/key instructions.
        index_factory, search_params, use_gpu, train_sample: the faiss index each rank builds over its shards.
        shard_size: corpus rows per store shard (the unit of work across ranks).
        batch_size, batch_tokens: texts per forward pass, or with `batch_tokens` as many length-sorted texts as fit
            that many padded tokens (`auto`: 32,768 on a GPU, 4,096 on a CPU; not under ZeRO-3, whose ranks must run
            equal numbers of forward passes).
        num_workers: DataLoader workers tokenising corpus slices while the model runs (0: in the training process;
            `auto`: several on a GPU, 0 on a CPU, see `resolve_num_workers`).
        token_cache: keep the corpus's token ids under `$EMBEDDER_CACHE/tokens`: every evaluation after the first
            reads them instead of tokenising.
        work_dir: where the stores of trained steps go (`output_dir`); None: a folder under `$EMBEDDER_CACHE`.
        during_fit: evaluate this set at the validations during training (false: only before and after, e.g. a test
            split that nothing may be selected on).
        keep_stores: keep the latest trained weights' stores until the next validation (the final state's
            evaluation after training then encodes nothing); false: delete them after each validation (disk).
    """

    def __init__(self, name: str, eval_data: str, corpus: str | None, instruction: Instruction,
                 data_root: str | None, key_template: str = "{title} {text}",
                 metrics: list[str] = ("mrr", "recall", "ndcg"), cutoffs: list[int] = (1, 5, 10, 100),
                 hits: int = 100, mode: str = "retrieval", query_max_length: int = 256, key_max_length: int = 256,
                 batch_size: int = 128, batch_tokens: int | str = "auto", num_workers: int | str = "auto", token_cache: bool = True,
                 index_factory: str = "Flat", search_params: Mapping[str, float] | None = None,
                 use_gpu: bool | str = "auto", train_sample: int = 100_000, shard_size: int = 100_000,
                 work_dir: str | None = None, during_fit: bool = True, keep_stores: bool = True,
                 training_run: bool = False):
        if mode not in MODES:
            raise ValueError(f"eval.{name}.mode={mode!r}; valid: retrieval, rerank")
        self.name, self.instruction = name, instruction
        self.query_max_length, self.key_max_length, self.batch_size = query_max_length, key_max_length, batch_size
        self.batch_tokens, self.num_workers, self.token_cache = batch_tokens, num_workers, bool(token_cache)
        self.index_factory, self.search_params, self.use_gpu = index_factory, dict(search_params or {}), use_gpu
        self.train_sample, self.shard_size, self.work_dir = int(train_sample), int(shard_size), work_dir
        self.during_fit, self.keep_stores = bool(during_fit), bool(keep_stores)
        (queries_path,) = resolve_files(eval_data, data_root, what=f"eval.{name}.eval_data")
        corpus_path = resolve_files(corpus, data_root, what=f"eval.{name}.corpus", allow_dirs=True)[0] if corpus else None
        self.corpus = open_corpus(corpus_path, key_template) if corpus_path else None  # read on access
        self._encoder = None
        self.evaluator = RetrievalEvaluator(
            self._encode_rerank, list(iter_jsonl(queries_path)), self.corpus, key_template=key_template,
            metrics=list(metrics), cutoffs=list(cutoffs), hits=int(hits),
            metric="cos", mode=MODES[mode], corpus_path=corpus_path, queries_path=queries_path)
        self.preds: dict | None = None
        self._scored: tuple[str, dict[str, float], dict] | None = None  # (identity, metrics, preds) of the last call
        self.trained_folders: set[str] = set()  # trained weights' store folders this set used (release_trained_stores)
        self.latest_folder: str | None = None  # the hash-named folder of the weights scored last (kept by release)
        self.training_run = bool(training_run)  # in a training run only the untrained weights' stores are cached
        self.initial_identity: dict[str, Any] | None = None  # the untrained weights' (remember_untrained)

    # ------------------------------------------------------------------------------------------------ evaluate
    def remember_untrained(self, identity: dict[str, Any] | None) -> None:
        """The identity of the weights a training run starts from (None for a resumed run): their stores are cached
        across runs (evaluate_before costs one corpus encode per model). The set is built, and its records checked,
        before the model is loaded, so the identity comes when the model exists."""
        self.initial_identity = identity

    def evaluate(self, encoder, step: int | None = None) -> dict[str, float]:
        """Metrics of `encoder` on this set (same on every rank). `step`: the training step (0 = untrained, whose
        corpus stores are cached across runs when `initial_identity` is set)."""
        metric = "cos" if encoder.normalize else "ip"
        self.evaluator.metric = metric
        ident = encoder_identity(encoder)  # None under ZeRO-3: every rank gets None, so every rank takes one path
        key = json.dumps(ident, sort_keys=True, default=str) if ident is not None else None  # weights and settings
        if key is not None and self._scored is not None and self._scored[0] == key:
            log.info("eval %s: these weights were evaluated already (step %s); reusing their metrics", self.name, step)
            self.preds = self._scored[2]
            return dict(self._scored[1])
        if self.evaluator.mode == "rerank":
            self._encoder = encoder
            try:
                metrics, self.preds = self.evaluator.evaluate()
            finally:
                self._encoder = None
        else:
            self.preds = self._retrieve(encoder, metric, step, ident)
            metrics = self.evaluator.score(self.preds)
        self._scored = (key, dict(metrics), self.preds) if key is not None else None
        return metrics

    def _stores(self, ident: dict[str, Any] | None, step: int | None) -> tuple[str, dict[str, Any], bool]:
        """(folder, identity of the weights, whether the folder is a cache to keep).

        Keyed by a hash of the weights (not the step, which a `ddp_spawn` parent does not see): the untrained
        encoder's stores (`initial_identity`) and those of an encoder evaluated outside training are cached; a
        trained state's stores go to `work_dir/eval-encode/<weights hash>`, shared by the sets of a validation and
        kept for a later evaluation of the same weights until `release_trained_stores`. Under ZeRO-3 (no hash) the
        folder is named by the step.
        """
        if ident is not None and (not self.training_run or ident == self.initial_identity):
            return untrained_stores_dir(), ident, True
        base = os.path.join(self.work_dir or os.path.join(cache_root(), "eval-runs"), TRAINED_STORES)
        if ident is not None:
            return os.path.join(base, ident["weights"][:16]), ident, False
        return os.path.join(base, f"step-{step}"), {"step": step}, False

    def _retrieve(self, encoder, metric: str, step: int | None, ident: dict[str, Any] | None) -> dict:
        inst = self.instruction
        _, ids = self._search(encoder, [inst.query + q.text for q in self.evaluator.queries], self.evaluator.hits,
                              metric, step, ident)
        return {q.qid: [int(i) for i in row if i >= 0] for q, row in zip(self.evaluator.queries, ids)}

    def search(self, encoder, queries: list[str], hits: int, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, ids)`, each (Q, hits), of other `queries` (this set's query instruction is prepended) over this
        set's corpus, through the same stores as `evaluate`: after an evaluation of the same weights the corpus is
        not encoded again (re-mining with the model being trained uses it). Every rank calls it (DDP)."""
        ident = encoder_identity(encoder)
        metric = "cos" if encoder.normalize else "ip"
        return self._search(encoder, [self.instruction.query + q for q in queries], hits, metric, step, ident)

    def _search(self, encoder, query_texts: list[str], hits: int, metric: str, step: int | None,
                ident: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
        W, r = world_size(), rank()
        folder, identity, cached = self._stores(ident, step)
        if not cached and ident is None and folder not in self.trained_folders:
            # a step folder (no weights hash) may hold a crashed run's half-written stores of other weights: start
            # clean. A hash-named folder only ever holds these weights' stores, and its finished shards are reused.
            if r == 0:
                shutil.rmtree(folder, ignore_errors=True)
            _barrier()
        if not cached:
            self.trained_folders.add(folder)
        # step folders (ZeRO-3) and the untrained weights' cache are never kept by release_trained_stores
        self.latest_folder = folder if not cached and ident is not None else None
        return sharded_search(
            encoder, prefixed(self.corpus, self.instruction.key), query_texts, folder,
            identity, name=self.name, metric=metric, hits=hits, rank=r, world=W, barrier=_barrier,
            all_gather=_all_gather, query_max_length=self.query_max_length, key_max_length=self.key_max_length,
            shard_size=self.shard_size, batch_size=self.batch_size, batch_tokens=self.batch_tokens,
            num_workers=self.num_workers, token_cache=self.token_cache, index_factory=self.index_factory,
            use_gpu=self.use_gpu, search_params=self.search_params, train_sample=self.train_sample)

    # ------------------------------------------------------------------------------------------------ rerank
    def _encode_rerank(self, texts: list[str], kind: str):
        """(N, d) embeddings of a rerank set's few candidates. Under DDP each rank encodes a contiguous 1/world of
        the texts and the shards are all-gathered; every rank runs the same number of forward passes (ZeRO-3)."""
        prefix = self.instruction.query if kind == "query" else self.instruction.key
        max_len = self.query_max_length if kind == "query" else self.key_max_length
        texts = [prefix + t for t in texts]
        world = world_size()
        if world == 1 or len(texts) < world:
            return self._encoder.encode_texts(texts, kind=kind, max_length=max_len, batch_size=self.batch_size,
                                              batch_tokens=self.batch_tokens).numpy()
        bounds = [len(texts) * i // world for i in range(world + 1)]  # contiguous shards, sizes differ by <= 1
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        shard = texts[bounds[rank()]:bounds[rank() + 1]]
        shard = shard + [shard[-1]] * (max(sizes) - len(shard))
        device = next(self._encoder.parameters()).device
        # batch_size batches: every rank runs the same number of forward passes (ZeRO-3 gathers inside each)
        local = self._encoder.encode_texts(shard, kind=kind, max_length=max_len, batch_size=self.batch_size).to(device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(gathered, local)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).cpu().numpy()  # (N, d)


def release_trained_stores(eval_sets: list[EvalSet], keep_latest: bool = False) -> None:
    """Delete the trained weights' store folders the sets used (rank 0, after every rank is done with them); with
    `keep_latest`, the folders of the validation that just ended stay for a later evaluation of the same weights,
    for the sets whose `keep_stores` allows it. Called at each validation's end and at the end of the run."""
    _barrier()
    keep = {es.latest_folder for es in eval_sets if keep_latest and es.keep_stores and es.latest_folder}
    for es in eval_sets:
        gone = es.trained_folders - keep
        if rank() == 0:
            for folder in gone:
                shutil.rmtree(folder, ignore_errors=True)
        es.trained_folders -= gone
    _barrier()


def build_eval_sets(eval_cfg: Mapping[str, Any] | None, tasks: dict[str, RecordKind], data_root: str | None,
                    query_max_length: int, key_max_length: int, work_dir: str | None = None,
                    training_run: bool = False) -> list[EvalSet]:
    """EvalSets from the `eval:` config mapping (entries set to null are skipped); their records are read and
    checked here, before any model is loaded."""
    out = []
    for name, spec in (eval_cfg or {}).items():
        if spec is None:
            continue
        spec = dict(spec)
        task = spec.pop("record_kind", None)
        if task not in tasks:
            raise ValueError(f"eval.{name}.record_kind={task!r}; valid: {', '.join(sorted(tasks))}")
        out.append(EvalSet(name, instruction=tasks[task].instruction, data_root=data_root,
                           query_max_length=query_max_length, key_max_length=key_max_length, work_dir=work_dir,
                           training_run=training_run, **spec))
    return out
