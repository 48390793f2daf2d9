"""`run_evaluate(cfg)`: what `python -m embedder.evaluate task=tool model=...` does (embedder/evaluate.py is its
entry point, as mine.py is mining.run's): evaluate any encoder (or BM25) on retrieval eval sets.

What is evaluated:

- by default, the `eval:` sets of the chosen `task=` config (the same sets `train.py` evaluates), with that task's
  instructions from the `version=` table;
- or one file: `eval_data=<file or BEIR folder> corpus=<file> instruction_kind=<task for instructions>`.

Which encoder: `model=` (minilm = the bundled all-MiniLM-L6-v2, bge_base_en, ...) and/or `model_path=` (a
`train.py` output folder, a sentence-transformers folder, or a hub name). `retriever=bm25` evaluates BM25 instead.

Outputs under `output_dir`: `<set>.result.json` (per query: `query_id`, ranked `pred` corpus rows, `scores`) and
`metrics.json` (`{set: {metric@k: value}}` plus what ran). Corpus embeddings and indexes are cached there too,
so a second run of the same model on the same corpus only encodes the queries. `run_evaluate` returns
`{"<set>/<metric>@<k>": value}`.

Encoding runs through Lightning predict on the `trainer=` devices (`trainer=ddp` for all GPUs, `trainer=ddp_sim`
for 2 CPU processes); the metrics do not depend on the number of devices.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Hashable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from embedder.atomic import write_json
from embedder.data.beir import load_beir
from embedder.data.corpus import open_corpus, texts_fingerprint
from embedder.data.jsonl import iter_jsonl, write_jsonl_atomic
from embedder.distributed import launched_rank
from embedder.evaluation.retrieval import MODES, RetrievalEvaluator
from embedder.fingerprint import fingerprint
from embedder.paths import is_beir_folder, resolve_files, resolve_path
from embedder.retrieval.base import search_in_shards
from embedder.retrieval.build import build_retriever, resolve_instruction

log = logging.getLogger(__name__)



def eval_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The eval sets to run: `eval_data=...` alone, else the task config's `eval:` entries (nulls skipped)."""
    defaults = {"key_template": cfg.key_template, "metrics": list(cfg.metrics), "cutoffs": list(cfg.cutoffs),
                "hits": cfg.hits, "mode": cfg.mode, "record_kind": cfg.get("instruction_kind")}
    if cfg.get("eval_data"):
        path = str(cfg.eval_data).rstrip("/")
        name = cfg.get("eval_name") or os.path.splitext(os.path.basename(path))[0]
        return [{"name": name, "eval_data": cfg.eval_data, "corpus": cfg.get("corpus"), **defaults}]
    specs = []
    eval_sets = cfg.get("eval")
    for name, spec in ((OmegaConf.to_container(eval_sets, resolve=True) if eval_sets else None) or {}).items():
        if spec is None:
            continue
        specs.append({"name": name, **defaults, **spec})
    if not specs:
        raise ValueError("nothing to evaluate: the task config has no eval sets; pass eval_data=<file or BEIR folder> "
                         "corpus=<corpus file>, or a task with eval sets (task=sample, tool, nq, qrecc)")
    return specs


def _run_mteb(cfg: DictConfig) -> dict[str, float]:
    """`mteb_tasks=[...]`: MTEB's own evaluation of the model (with its prompts); metrics.json as for eval sets."""
    from embedder.evaluation.mteb_tasks import run_mteb, sentence_transformer, tasks_by_name

    tasks = tasks_by_name([str(t) for t in cfg.mteb_tasks])  # an unknown name fails before the model loads
    path = cfg.get("model_path") or cfg.model.model_name_or_path
    q_inst, k_inst = resolve_instruction(cfg, cfg.get("instruction_kind"))
    model = sentence_transformer(str(path), q_inst, k_inst)
    metrics = run_mteb(model, tasks, cfg.output_dir, batch_size=int(cfg.retriever.get("batch_size", 64)))
    write_json(os.path.join(cfg.output_dir, "metrics.json"), {"mteb": metrics, "model": str(path)})
    for key in sorted(k for k in metrics if k.endswith("/main_score")):
        log.info("%s = %.4f", key, metrics[key])
    return metrics


def _load_inputs(spec: dict[str, Any], cfg: DictConfig
                 ) -> tuple[list, Sequence[str] | None, Sequence[str] | None, str, str | None]:
    """`(queries as (line, record), corpus texts, corpus ids, queries path, corpus path)` for one eval set.

    The corpus (JSON lines, a parquet file or a folder of parquet shards) is read on access, not loaded."""
    fmt = cfg.get("format", "auto")
    raw = resolve_path(spec["eval_data"], cfg.data_root)
    if fmt == "beir" or (fmt == "auto" and is_beir_folder(raw)):
        data = load_beir(raw, cfg.get("split", "test"), spec["key_template"])
        return list(enumerate(data.queries, start=1)), data.corpus, data.doc_ids, os.path.join(raw, "queries.jsonl"), \
            os.path.join(raw, "corpus.jsonl")
    (queries_path,) = resolve_files(spec["eval_data"], cfg.data_root, what=f"eval {spec['name']}: eval_data")
    queries = list(iter_jsonl(queries_path))
    if not spec.get("corpus"):
        return queries, None, None, queries_path, None
    (corpus_path,) = resolve_files(spec["corpus"], cfg.data_root, what=f"eval {spec['name']}: corpus",
                                   allow_dirs=True)
    corpus = open_corpus(corpus_path, spec["key_template"])
    return queries, corpus.texts, corpus.ids, queries_path, corpus_path


def run_evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate every eval set of `cfg`; write result and metrics files; return `{"<set>/<metric>": value}`."""
    if cfg.get("mteb_tasks"):
        return _run_mteb(cfg)
    specs = eval_specs(cfg)
    prepared = []
    for spec in specs:  # all inputs are read and checked before any model loads
        if spec["mode"] not in MODES:
            raise ValueError(f"eval {spec['name']}: mode={spec['mode']!r}; valid: retrieval, rerank")
        queries, corpus_texts, corpus_ids, queries_path, corpus_path = _load_inputs(spec, cfg)
        evaluator = RetrievalEvaluator(
            None, queries, corpus_texts, metrics=spec["metrics"], cutoffs=spec["cutoffs"],
            hits=int(spec["hits"]), mode=MODES[spec["mode"]], corpus_path=corpus_path, queries_path=queries_path)
        prepared.append((spec, evaluator, corpus_ids))

    encoder = trainer = None
    if not cfg.retriever.get("uses_model") and launched_rank() > 0:  # a retriever without a model (BM25) under torchrun/SLURM: rank 0 does it all
        return {}
    if cfg.retriever.get("uses_model"):
        from embedder.retrieval.encode import make_predict_trainer
        from embedder.retrieval.encode.model import load_encoder

        encoder = load_encoder(cfg.model, cfg.get("model_path"))
        trainer = make_predict_trainer(cfg.get("trainer"))

    results: dict[str, dict[str, float]] = {}
    for spec, evaluator, corpus_ids in prepared:
        q_inst, k_inst = resolve_instruction(cfg, spec.get("record_kind")) if encoder is not None else ("", "")
        if evaluator.mode == "rerank":
            if encoder is None:
                raise ValueError(f"eval {spec['name']}: rerank mode needs an encoder (a retriever that uses the model, e.g. retriever=dense)")
            if trainer is not None and not trainer.is_global_zero:
                continue
            evaluator.encode = _text_encoder(encoder, q_inst, k_inst, cfg)
            metrics, preds = evaluator.evaluate()
            scores = None
        else:
            dims = [int(d) for d in (cfg.get("truncate_dims") or [])]
            if dims and getattr(cfg.retriever, "_target_", "").split(".")[-1] != "dense_retriever":
                raise ValueError("truncate_dims applies to dense retrieval (retriever=dense)")
            retriever = build_retriever(cfg, cfg.output_dir, q_inst, k_inst, encoder=encoder, trainer=trainer)
            if not retriever.prepare(evaluator.corpus_texts, [q.text for q in evaluator.queries]):
                continue  # a non-zero rank of a ddp run: its shards are encoded, rank 0 searches
            preds, scores = _search(spec, evaluator, corpus_ids, cfg, retriever)
            metrics = evaluator.score(preds)  # graded nDCG where the records carry grades
            results[spec["name"]] = metrics
            for dim in dims:  # each Matryoshka prefix of the same stored embeddings (one encoding)
                retriever.set_truncate_dim(dim)
                by_dim = evaluator.score(_search(spec, evaluator, corpus_ids, cfg, retriever)[0])
                results[f"{spec['name']}/dim{dim}"] = by_dim
                log.info("%s at %d dimensions: %s", spec["name"], dim, ", ".join(f"{k}={v:.4f}" for k, v in by_dim.items()))
        results[spec["name"]] = metrics
        write_jsonl_atomic(os.path.join(cfg.output_dir, f"{spec['name']}.result.json"), (
            {"query_id": q.qid, "pred": preds.get(q.qid, []),
             **({"scores": scores[q.qid]} if scores is not None else {})} for q in evaluator.queries))
        log.info("%s: %s", spec["name"], ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    if trainer is not None and not trainer.is_global_zero:
        return {}
    meta = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": None if encoder is None else getattr(encoder, "model_name_or_path", None),
            "retriever": OmegaConf.to_container(cfg.retriever, resolve=True),
            "index": OmegaConf.to_container(cfg.index, resolve=True) if encoder is not None else None,
            "version": cfg.version.get("name") if cfg.get("version") else None}
    write_json(os.path.join(cfg.output_dir, "metrics.json"), {**results, "_run": meta})
    print(metrics_table(results))
    return {f"{name}/{k}": v for name, m in results.items() for k, v in m.items()}


def _text_encoder(encoder: Any, q_inst: str, k_inst: str, cfg: DictConfig):
    def encode(texts: list[str], kind: str):
        prefix, max_len = (q_inst, cfg.query_max_length) if kind == "query" else (k_inst, cfg.key_max_length)
        return encoder.encode_texts([prefix + t for t in texts], kind=kind, max_length=max_len,
                                    batch_size=cfg.retriever.get("batch_size", 128),
                                    batch_tokens=cfg.retriever.get("batch_tokens", 0)).numpy()
    return encode


def _search(spec: dict[str, Any], evaluator: RetrievalEvaluator, corpus_ids: list[str] | None, cfg: DictConfig,
            retriever: Any) -> tuple[dict, dict]:
    """Search the corpus for every query with a prepared retriever (resumable: the search shards are kept under
    output_dir/search, named by the retriever's settings and the texts); `({qid: rows}, {qid: scores})`."""
    hits = int(spec["hits"])
    ignore_same = bool(cfg.get("ignore_identical_ids")) and corpus_ids is not None
    k = hits + 1 if ignore_same else hits
    query_texts = [q.text for q in evaluator.queries]
    key = fingerprint(retriever.describe(), texts_fingerprint(evaluator.corpus_texts), texts_fingerprint(query_texts), k)
    scores, ids = search_in_shards(retriever, len(query_texts), k, os.path.join(cfg.output_dir, "search", key),
                                   shard_size=int(cfg.query_shard_size))
    preds: dict[Hashable, list[int]] = {}
    pred_scores: dict[Hashable, list[float]] = {}
    for q, row_s, row_i in zip(evaluator.queries, scores, ids):
        keep = [(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0 and
                not (ignore_same and corpus_ids[int(i)] == str(q.qid))][:hits]
        preds[q.qid] = [i for i, _ in keep]
        pred_scores[q.qid] = [round(s, 6) for _, s in keep]
    return preds, pred_scores


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """One line per eval set and metric."""
    lines = [f"{'eval set':<20}{'metric':<22}{'value':>10}"]
    for name, metrics in results.items():
        for key in metrics:
            lines.append(f"{name:<20}{key:<22}{metrics[key]:>10.4f}")
    return "\n".join(lines)
