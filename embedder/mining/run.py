"""`run_mine(cfg)`: everything `mine.py` does (retrieve for a training file, write hard negatives), callable from tests.

Flow (reference §6.3, with the fixes listed in `negatives.py`):

1. Read and check the corpus and the training file (bad records stop the run with file and line, or are skipped
   and counted with `skip_bad_records=true`). Nothing is loaded onto a device before this passes.
2. Retrieve `hits` documents per query with the chosen retriever (`retriever=dense|bm25`), in query shards that are
   saved as they finish, so a crashed run resumes.
3. For every record keep up to `max_neg_num` negatives from the `rank_range` positions, without positives (by
   `pos_index` and by text), duplicates, or (with `filter_answers`) passages containing an answer; with
   `random_fill`, a record left with fewer gets random corpus passages up to that many (counted).
4. Write `<stem>.neg[.<save_name>].json` next to the input (or under `output_dir`), atomically: each record as it
   was, `neg`/`neg_index` replaced, `teacher_scores` removed. Also `<output_dir>/<stem>.result[.<save_name>].json`
   (the ranking: `query_id`, `pred`, `scores`) and `<output_dir>/<output name>.meta.json` (what ran, counts).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections import Counter
from typing import Any

from omegaconf import DictConfig

from embedder.atomic import write_json
from embedder.data.corpus import open_corpus, texts_fingerprint
from embedder.data.jsonl import write_jsonl_atomic
from embedder.data.queries import load_queries
from embedder.distributed import launched_rank
from embedder.fingerprint import fingerprint
from embedder.mining.negatives import MARGIN_DROP, NegativeRule, negatives_for_rankings
from embedder.paths import resolve_files
from embedder.retrieval.base import search_in_shards
from embedder.retrieval.build import build_retriever, resolve_instruction

log = logging.getLogger(__name__)

SAMPLE_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data")


def output_paths(eval_path: str, cfg: DictConfig) -> tuple[str, str]:
    """`(mined file, result file)` following the reference's names."""
    stem = os.path.splitext(os.path.basename(eval_path))[0]
    suffix = f".{cfg.save_name}" if cfg.get("save_name") else ""
    name = f"{stem}.neg{suffix}.json"
    folder = os.path.dirname(os.path.abspath(eval_path))
    if cfg.get("save_to_output"):
        folder = cfg.output_dir
    elif os.path.abspath(eval_path).startswith(SAMPLE_DATA + os.sep):
        log.info("the input is the bundled sample data (inside the installed package): writing under output_dir=%s "
                 "instead of next to it", cfg.output_dir)
        folder = cfg.output_dir
    return os.path.join(folder, name), os.path.join(cfg.output_dir, f"{stem}.result{suffix}.json")


def run_mine(cfg: DictConfig) -> dict[str, Any]:
    """Mine hard negatives as `cfg` says; returns counts and the output path (empty on non-zero ranks)."""
    start = time.time()
    (eval_path,) = resolve_files(cfg.input_data, cfg.data_root, what="input_data")
    (corpus_path,) = resolve_files(cfg.corpus, cfg.data_root, what="corpus", allow_dirs=True)
    hits = int(cfg.hits)
    rule = NegativeRule.for_hits(hits, cfg.rank_range, rank_range_of=cfg.get("rank_range_of") or "ranking",
                                 max_neg_num=int(cfg.max_neg_num),
                                 filter_answers=bool(cfg.filter_answers), answer_match=cfg.answer_match,
                                 relative_margin=cfg.get("relative_margin"), random_fill=cfg.get("random_fill"))
    seed = int(cfg.get("seed") or 0)

    # 1. inputs, checked before any model work
    corpus = open_corpus(corpus_path, cfg.key_template)  # JSON lines or parquet, read on access
    queries = load_queries(eval_path, len(corpus), skip_bad=bool(cfg.skip_bad_records))  # checked, read on access
    out_path, result_path = output_paths(eval_path, cfg)
    if os.path.abspath(out_path) == os.path.abspath(eval_path):
        raise ValueError(f"the output {out_path} would overwrite the input; set save_name")
    task = cfg.get("instruction_kind") or queries[0].record.get("task")
    q_inst, k_inst = resolve_instruction(cfg, task) if cfg.retriever.get("uses_model") else ("", "")
    log.info("mining %s: %d queries against %s (%d documents), retriever=%s, hits=%d, rank_range=[%d, %d) "
             "of the %s hits, max_neg_num=%d", eval_path, len(queries), corpus_path, len(corpus), cfg.retriever.name,
             hits, *rule.rank_range, rule.rank_range_of, rule.max_neg_num)

    # 2. retrieve (resumable)
    if not cfg.retriever.get("uses_model") and launched_rank() > 0:
        log.info("rank %d: retriever=%s runs on rank 0 only", launched_rank(), cfg.retriever.name)
        return {}
    retriever = build_retriever(cfg, cfg.output_dir, q_inst, k_inst)
    query_texts = queries.queries
    if not retriever.prepare(corpus, query_texts):
        return {}
    key = fingerprint(retriever.describe(), corpus.fingerprint(), texts_fingerprint(query_texts), hits)
    scores, ids = search_in_shards(retriever, len(query_texts), hits, os.path.join(cfg.output_dir, "search", key),
                                   shard_size=int(cfg.query_shard_size))

    # 3. negatives, streamed (a block of queries at a time)
    dropped, counts = Counter(), Counter()
    mined_records = negatives_for_rankings(queries, ids, scores, corpus, rule, seed, dropped, counts)

    # 4. outputs, each written atomically
    written = write_jsonl_atomic(out_path, mined_records)
    no_negatives = counts["no negatives"]
    write_jsonl_atomic(result_path, (
        {"query_id": rec.query_id, "pred": [int(i) for i in row_ids if i >= 0],
         "scores": [round(float(s), 6) for s, i in zip(row_scores, row_ids) if i >= 0]}
        for rec, row_ids, row_scores in zip(queries, ids, scores)))
    stats = {
        "output": out_path, "result": result_path, "records": queries.total, "written": written,
        "skipped_bad_records": dict(queries.skipped), "skipped_no_negatives": no_negatives,
        "filled_with_random": counts["filled"], "random_negatives": counts["random negatives"],
        "dropped_candidates": dict(dropped), "seconds": round(time.time() - start, 1),
    }
    meta = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "input_data": eval_path,
            "corpus": corpus_path, "key_template": cfg.key_template, "task": task, "query_instruction": q_inst,
            "key_instruction": k_inst, "hits": hits, "rank_range": list(rule.rank_range),
            "rank_range_of": rule.rank_range_of, "max_neg_num": rule.max_neg_num, "relative_margin": rule.relative_margin,
            "filter_answers": rule.filter_answers, "answer_match": rule.answer_match,
            "random_fill": rule.random_fill, "seed": seed,
            **retriever.describe(), **stats}
    meta_path = os.path.join(cfg.output_dir, os.path.basename(out_path)[:-len(".json")] + ".meta.json")
    write_json(meta_path, meta)
    skipped = sum(queries.skipped.values())
    filled = (f", {counts['filled']} filled with {counts['random negatives']} random negatives (random_fill="
              f"{rule.random_fill})" if rule.random_fill else "")
    log.info("wrote %d of %d records to %s (%d skipped as bad input, %d with no negatives left%s); dropped "
             "candidates: %s; %.1fs", written, queries.total, out_path, skipped, no_negatives, filled,
             dict(dropped) or "none", stats["seconds"])
    _warn_if_many_left_out(no_negatives, written, dropped, rule)
    return stats


def _warn_if_many_left_out(no_negatives: int, written: int, dropped: Counter, rule: Any) -> None:
    """A warning, with the filter to loosen, when over 10% of the queries are left with no negatives (they leave
    training). The margin filter is the usual cause when the retriever's scores barely separate documents: an
    untrained decoder's last-token embeddings (cosines all ~0.99) left 673 of 1,400 ToolLens queries without one."""
    if no_negatives <= 0.1 * (written + no_negatives):
        return
    share = f"{no_negatives} of {written + no_negatives} queries ({no_negatives / (written + no_negatives):.0%})"
    in_range = {k: v for k, v in dropped.items() if k != "above rank range"}
    if in_range and max(in_range, key=in_range.get) == MARGIN_DROP:
        log.warning("%s have no negatives left and leave training: relative_margin=%s dropped most candidates, so "
                    "the retriever scores them almost like the positives (an untrained or weak model does). Set "
                    "relative_margin=null, random_fill=<n>, or mine with bm25 (task=beir: beir.negatives.*)", share,
                    rule.relative_margin)
    else:
        log.warning("%s have no negatives left and leave training: widen rank_range=%s or hits, or set "
                    "random_fill=<n> (task=beir: beir.negatives.*)", share, list(rule.rank_range))
