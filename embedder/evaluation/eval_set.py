"""An evaluation set from config: eval file + corpus + the task whose instructions encode them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from embedder.data.corpus import open_corpus
from embedder.data.jsonl import iter_jsonl
from embedder.data.tasks import Instruction, TaskSettings
from embedder.distributed import rank, world_size
from embedder.evaluation.retrieval import RetrievalEvaluator
from embedder.paths import resolve_files

MODES = {"retrieval": "retrieve", "retrieve": "retrieve", "rerank": "rerank"}


class EvalSet:
    """Reads the files once; `evaluate(encoder)` encodes with the encoder's current weights and scores."""

    def __init__(self, name: str, eval_data: str, corpus: str | None, instruction: Instruction,
                 data_root: str | None, key_template: str = "{title} {text}",
                 metrics: list[str] = ("mrr", "recall", "ndcg"), cutoffs: list[int] = (1, 5, 10, 100),
                 hits: int = 100, mode: str = "retrieval", query_max_length: int = 256, key_max_length: int = 256,
                 batch_size: int = 128, index_factory: str = "Flat"):
        if mode not in MODES:
            raise ValueError(f"eval.{name}.mode={mode!r}; valid: retrieval, rerank")
        self.name, self.instruction = name, instruction
        self.query_max_length, self.key_max_length, self.batch_size = query_max_length, key_max_length, batch_size
        (queries_path,) = resolve_files(eval_data, data_root, what=f"eval.{name}.eval_data")
        corpus_path = resolve_files(corpus, data_root, what=f"eval.{name}.corpus", allow_dirs=True)[0] if corpus else None
        corpus_rows = open_corpus(corpus_path, key_template) if corpus_path else None  # read on access
        self._encoder = None
        self.evaluator = RetrievalEvaluator(
            self._encode, list(iter_jsonl(queries_path)), corpus_rows, key_template=key_template,
            metrics=list(metrics), cutoffs=list(cutoffs), hits=int(hits), index_factory=index_factory,
            metric="cos", mode=MODES[mode], corpus_path=corpus_path, queries_path=queries_path)
        self.preds: dict | None = None

    def _encode(self, texts: list[str], kind: str):
        """(N, d) embeddings. Under DDP each rank encodes a contiguous 1/world of the texts and the shards are
        all-gathered, so every rank ends with the same full matrix at 1/world of the encoding cost."""
        prefix = self.instruction.query if kind == "query" else self.instruction.key
        max_len = self.query_max_length if kind == "query" else self.key_max_length
        texts = [prefix + t for t in texts]
        world = world_size()
        if world == 1 or len(texts) < world:
            return self._encode_local(texts, kind, max_len).numpy()
        bounds = [len(texts) * i // world for i in range(world + 1)]  # contiguous shards, sizes differ by <= 1
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        shard = texts[bounds[rank()]:bounds[rank() + 1]]
        # Pad every shard to the same length: each rank then runs the same number of forward passes, which
        # DeepSpeed ZeRO-3 needs (its parameter all-gathers happen inside every forward).
        shard = shard + [shard[-1]] * (max(sizes) - len(shard))
        device = next(self._encoder.parameters()).device
        local = self._encode_local(shard, kind, max_len).to(device)  # (max_size, d)
        gathered = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(gathered, local)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).cpu().numpy()  # (N, d)

    def _encode_local(self, texts: list[str], kind: str, max_len: int) -> torch.Tensor:
        return self._encoder.encode_texts(texts, kind=kind, max_length=max_len, batch_size=self.batch_size)

    def evaluate(self, encoder) -> dict[str, float]:
        self._encoder = encoder
        self.evaluator.metric = "cos" if encoder.normalize else "ip"
        try:
            metrics, self.preds = self.evaluator.evaluate()
        finally:
            self._encoder = None
        return metrics


def build_eval_sets(eval_cfg: Mapping[str, Any] | None, tasks: dict[str, TaskSettings], data_root: str | None,
                    query_max_length: int, key_max_length: int) -> list[EvalSet]:
    """EvalSets from the `eval:` config mapping (entries set to null are skipped)."""
    out = []
    for name, spec in (eval_cfg or {}).items():
        if spec is None:
            continue
        spec = dict(spec)
        task = spec.pop("task", None)
        if task not in tasks:
            raise ValueError(f"eval.{name}.task={task!r}; valid: {', '.join(sorted(tasks))}")
        out.append(EvalSet(name, instruction=tasks[task].instruction, data_root=data_root,
                           query_max_length=query_max_length, key_max_length=key_max_length, **spec))
    return out
