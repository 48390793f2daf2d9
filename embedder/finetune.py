"""Fine-tune on your own BEIR folder in one command: `python train.py task=beir beir.folder=/data/beir/scifact`.

`prepare_beir_run(cfg)` runs before training when `beir.folder` is set, and fills in `train_data` and `eval`:

1. **split** (`<output_dir>/data/`): the BEIR folder (`corpus.jsonl` or `corpus.jsonl.gz`, `queries.jsonl`,
   `qrels/<split>.tsv`) becomes `corpus.json` (row i = document i), `train.json` (one record per train query with
   its positives' texts and rows), `dev.json` and, when `qrels/<test split>.tsv` exists, `test.json`. A folder
   without a dev split gets one: a seeded `dev_fraction` of the train queries, held out from training.
2. **mine** (`<output_dir>/data/mine-<retriever>/`): hard negatives for `train.json` with `mine.py`'s own code
   (`run_mine`), from the dense model being fine-tuned and/or BM25, from ranks `rank_range`, with the
   false-negative filter `relative_margin`. Two retrievers are merged into one list per query, alternating.
3. **score** (optional, `beir.teacher.lm`; `<output_dir>/data/score-<lm>/`): an LM's query likelihood
   log p(query | candidate) for each train query's positives and first negatives (`score.py`'s code, `run_score`,
   with the `beir` template: UPR, Sachan et al. 2022), which train.py distils with `beir.teacher.distill_weight`.
4. train.py then trains on the mined (and scored) file and evaluates dev (and test) before and after, as for any
   task.

Every step writes atomically and records what it was made from (`prepare.json`, the mined files' `.meta.json`);
a rerun with the same inputs and settings skips it. Memory follows the qrels (query texts and positive texts of
the train split), never the corpus, which is streamed.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from embedder.atomic import read_json, write_json
from embedder.config import compose
from embedder.data.jsonl import iter_jsonl, write_jsonl_atomic
from embedder.data.records import format_key
from embedder.errors import DataError
from embedder.evaluation.beir import read_qrels
from embedder.fingerprint import fingerprint

log = logging.getLogger("embedder.finetune")

PREPARE_VERSION = 2  # bump when the prepared files change shape (2: train records carry `answers`)


def split_query_ids(query_ids: list[str], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """`(train ids, dev ids)`: a seeded `dev_fraction` of the ids held out; the same ids and seed give the same split
    on every machine (the ids are sorted before the shuffle)."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"beir.dev_fraction must be between 0 and 1, got {dev_fraction}")
    order = sorted(query_ids)
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(len(order) * dev_fraction))
    dev = set(order[:n_dev])
    return [q for q in sorted(query_ids) if q not in dev], sorted(dev)


def _find(folder: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _iter_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """A BEIR JSON-lines file (`.gz` too), each record checked for its `_id`."""
    for line, rec in iter_jsonl(path):
        if rec.get("_id") is None:
            raise DataError("a BEIR record needs an '_id'", path=path, line=line, field="_id",
                            hint='a line looks like {"_id": "4983", "title": ..., "text": ...}')
        yield line, rec


def _stat_key(paths: list[str | None]) -> list[Any]:
    return [[p, os.path.getsize(p), int(os.path.getmtime(p))] for p in paths if p]


def beir_inputs(folder: str, splits: dict[str, str | None]) -> dict[str, str | None]:
    """The folder's files: corpus, queries and the qrels of each split (None where a split has no file)."""
    corpus, queries = _find(folder, "corpus.jsonl"), _find(folder, "queries.jsonl")
    if corpus is None or queries is None:
        missing = "corpus.jsonl" if corpus is None else "queries.jsonl"
        raise FileNotFoundError(f"beir.folder={folder!r}: {missing} (or {missing}.gz) not found; a BEIR folder holds "
                                "corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    out: dict[str, str | None] = {"corpus": corpus, "queries": queries}
    for role, split in splits.items():
        path = os.path.join(folder, "qrels", f"{split}.tsv") if split else None
        out[role] = path if path and os.path.isfile(path) else None
    if out["train"] is None:
        have = sorted(os.listdir(os.path.join(folder, "qrels"))) if os.path.isdir(os.path.join(folder, "qrels")) else []
        raise FileNotFoundError(f"beir.folder={folder!r}: qrels/{splits['train']}.tsv not found (qrels present: "
                                f"{have}); set beir.train_split to the split to train on")
    return out


def prepare_beir(folder: str, out_dir: str, train_split: str = "train", dev_split: str | None = "dev",
                 test_split: str | None = "test", dev_fraction: float = 0.2, seed: int = 42,
                 key_template: str = "{title} {text}") -> dict[str, Any]:
    """Step 1 (see the module docstring); returns the written paths and counts, from the cache when unchanged.
    `key_template` makes a train positive's text from its document, as mining and evaluation make theirs."""
    inputs = beir_inputs(folder, {"train": train_split, "dev": dev_split, "test": test_split})
    key = {"version": PREPARE_VERSION, "files": _stat_key(list(inputs.values())), "dev_fraction": dev_fraction,
           "seed": seed, "splits": [train_split, dev_split, test_split], "key_template": key_template}
    manifest_path = os.path.join(out_dir, "prepare.json")
    if os.path.isfile(manifest_path):
        manifest = read_json(manifest_path)
        if manifest.get("key") == key and all(os.path.isfile(p) for p in manifest["paths"].values()):
            log.info("beir: %s already prepared in %s (%s); reusing it", folder, out_dir, manifest["counts"])
            return manifest
    os.makedirs(out_dir, exist_ok=True)

    qrels = {role: read_qrels(path) for role, path in inputs.items() if role in ("train", "dev", "test") and path}
    held_out = None
    if "dev" not in qrels:
        train_ids, dev_ids = split_query_ids(list(qrels["train"]), dev_fraction, seed)
        qrels["dev"] = {q: qrels["train"][q] for q in dev_ids}
        qrels["train"] = {q: qrels["train"][q] for q in train_ids}
        held_out = len(dev_ids)
        log.info("beir: no qrels/%s.tsv: held out %d of %d train queries as dev (seed %d, fraction %.2f)",
                 dev_split, len(dev_ids), len(dev_ids) + len(train_ids), seed, dev_fraction)
    train_docs = {d for docs in qrels["train"].values() for d, g in docs.items() if g > 0}
    wanted = {d for split in qrels.values() for docs in split.values() for d in docs}

    # the corpus, streamed once: corpus.json rows, and the rows (and, for train positives, texts) the qrels need
    row_of: dict[str, int] = {}
    pos_text: dict[str, str] = {}

    def documents() -> Iterator[dict[str, str]]:
        row = 0
        for line, rec in _iter_records(inputs["corpus"]):
            did = str(rec["_id"])
            if did in row_of:
                raise DataError(f"duplicate document id {did!r}", path=inputs["corpus"], line=line, field="_id")
            doc = {"id": did, "title": str(rec.get("title") or ""), "text": str(rec.get("text") or "")}
            if did in wanted:
                row_of[did] = row
                if did in train_docs:
                    pos_text[did] = format_key(doc, key_template, inputs["corpus"], line).strip()
            row += 1
            yield doc

    paths = {"corpus": os.path.join(out_dir, "corpus.json")}
    n_docs = write_jsonl_atomic(paths["corpus"], documents())
    wanted_queries = {q for split in qrels.values() for q in split}
    query_text = {str(rec["_id"]): str(rec.get("text") or "") for _, rec in _iter_records(inputs["queries"])
                  if str(rec["_id"]) in wanted_queries}

    counts: dict[str, Any] = {"documents": n_docs}
    skipped: Counter = Counter()
    for role, split in qrels.items():
        records = []
        for qid, docs in split.items():
            text = query_text.get(qid, "").strip()
            if not text:
                skipped[f"{role}: query missing from queries.jsonl or empty"] += 1
                continue
            pos = [(row_of[d], g, d) for d, g in docs.items() if g > 0 and d in row_of]
            skipped[f"{role}: qrels document not in the corpus"] += sum(1 for d in docs if d not in row_of)
            if not pos:
                skipped[f"{role}: query without a relevant document"] += 1
                continue
            if role == "train":
                records.append({"query_id": qid, "query": text, "pos": [pos_text[d] for _, _, d in pos],
                                "pos_index": [r for r, _, _ in pos],
                                "answers": [text]})  # what an LM teacher scores: the query, given each candidate
            else:
                records.append({"query_id": qid, "query": text, "pos_index": [r for r, _, _ in pos],
                                "pos_relevance": [g for _, g, _ in pos]})
        paths[role] = os.path.join(out_dir, f"{role}.json")
        counts[role] = write_jsonl_atomic(paths[role], records)
    skipped = Counter({k: v for k, v in skipped.items() if v})
    if skipped:
        log.warning("beir: skipped %s", ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items())))
    manifest = {"key": key, "folder": os.path.abspath(folder), "paths": paths, "counts": counts,
                "dev_held_out_from_train": held_out, "skipped": dict(skipped)}
    write_json(manifest_path, manifest)  # last: it marks the step done
    log.info("beir: prepared %s -> %s: %s", folder, out_dir, counts)
    return manifest


def mine_negatives(cfg: DictConfig, prepared: dict[str, Any], out_dir: str) -> str:
    """Step 2: mine `train.json` with each retriever of `beir.negatives.retrievers`; returns the training file."""
    from embedder.mining.run import run_mine

    neg = cfg.beir.negatives
    retrievers = list(neg.retrievers or [])
    if not retrievers:
        return prepared["paths"]["train"]
    mined, keys = [], []
    for name in retrievers:
        if name not in ("dense", "bm25"):
            raise DataError(f"{name!r} is not a retriever here", field="beir.negatives.retrievers",
                            hint="use bm25, dense, both ([dense,bm25]) or [] (in-batch negatives only)")
        folder = os.path.join(out_dir, f"mine-{name}")
        overrides = [f"retriever={name}", f"input_data={prepared['paths']['train']}",
                     f"corpus={prepared['paths']['corpus']}", f"output_dir={folder}", "save_to_output=true",
                     f"save_name={name}", f"hits={int(neg.hits)}",
                     f"rank_range=[{int(neg.rank_range[0])},{int(neg.rank_range[1])}]",
                     f"max_neg_num={int(neg.max_neg_num)}", f"relative_margin={neg.relative_margin}",
                     f"query_max_length={int(cfg.query_max_length)}",
                     f"key_max_length={int(cfg.key_max_length)}", "version=none"]
        mine_cfg = compose("mine", overrides)
        with open_dict(mine_cfg):
            mine_cfg.key_template = str(cfg.beir.eval_set.key_template)  # set, not overridden: any text is safe
            if name == "dense":  # the model being fine-tuned retrieves its own negatives
                mine_cfg.model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
                mine_cfg.retriever.batch_size = int(neg.get("batch_size") or 64)
        stats_path = os.path.join(folder, f"train.neg.{name}.stats.json")
        key = _mine_key(prepared, OmegaConf.to_container(mine_cfg, resolve=True))
        out_path = os.path.join(folder, f"train.neg.{name}.json")
        if _step_done(stats_path, key, out_path):
            log.info("beir: negatives from %s already mined (%s); reusing them", name, out_path)
        else:
            stats = run_mine(mine_cfg)
            write_json(stats_path, {"key": key, **{k: v for k, v in stats.items() if k != "key"}})
        mined.append(out_path)
        keys.append(key)
    if len(mined) == 1:
        return mined[0]
    merged = os.path.join(out_dir, "train.neg." + "+".join(retrievers) + ".json")
    merged_stats = merged[:-len(".json")] + ".stats.json"
    key = fingerprint(keys, int(neg.max_neg_num))
    if _step_done(merged_stats, key, merged):
        log.info("beir: negatives of %s already merged (%s); reusing them", " and ".join(retrievers), merged)
        return merged
    n = write_jsonl_atomic(merged, merge_negatives(prepared["paths"]["train"], mined, int(neg.max_neg_num)))
    write_json(merged_stats, {"key": key, "records": n, "from": mined})
    log.info("beir: merged the negatives of %s into %s (%d records)", " and ".join(retrievers), merged, n)
    return merged


def _step_done(stats_path: str, key: str, output: str | None = None) -> dict[str, Any] | None:
    """The cache check of steps 2 and 3: the step's stats (written last, so an interrupted step has none) when
    they record this `key` (inputs and settings) and its `output` (default: the stats' own "output") exists."""
    if not os.path.isfile(stats_path):
        return None
    stats = read_json(stats_path)
    output = output or stats.get("output") or ""
    return stats if stats.get("key") == key and os.path.isfile(output) else None


def _mine_key(prepared: dict[str, Any], mine_cfg: dict[str, Any]) -> str:
    relevant = {k: mine_cfg.get(k) for k in ("retriever", "model", "hits", "rank_range", "max_neg_num",
                                            "relative_margin", "key_template", "query_max_length", "key_max_length")}
    return fingerprint(prepared["key"], relevant)


def merge_negatives(train_path: str, paths: list[str], max_neg_num: int) -> Iterator[dict[str, Any]]:
    """One record per train query with the negatives of every mined file, alternating (1st of each, 2nd of each,
    ...) and de-duplicated by row, at most `max_neg_num`. Queries a file has no negatives for keep the other files'
    ones; queries no file has negatives for are left out, as `mine.py` leaves them out.

    Streamed: every mined file lists its queries in `train_path`'s order (mining keeps the input order and only
    drops queries), so one pass over all the files at once pairs them up, holding one record per file."""
    spine = (str(rec["query_id"]) for _, rec in iter_jsonl(train_path))
    readers = [iter_jsonl(path) for path in paths]
    heads: list[dict[str, Any] | None] = [next(r, (0, None))[1] for r in readers]
    for qid in spine:
        found = []
        for i, head in enumerate(heads):
            if head is not None and str(head["query_id"]) == qid:
                found.append(head)
                heads[i] = next(readers[i], (0, None))[1]
        if not found:
            continue
        rows, neg_index, neg = set(), [], []
        for rank in range(max(len(rec["neg_index"]) for rec in found)):
            for rec in found:
                if rank < len(rec["neg_index"]) and rec["neg_index"][rank] not in rows and len(neg) < max_neg_num:
                    rows.add(rec["neg_index"][rank])
                    neg_index.append(rec["neg_index"][rank])
                    neg.append(rec["neg"][rank])
        yield {**found[0], "neg": neg, "neg_index": neg_index}
    left = [path for path, head in zip(paths, heads) if head is not None]
    if left:  # a query out of order or not in the train file: the files were not mined from this train file
        raise DataError("mined negatives out of step with the train file", path=left[0],
                        hint=f"delete {os.path.dirname(left[0])} and run again; it is mined again from {train_path}")


def score_candidates(cfg: DictConfig, train_file: str, out_dir: str) -> str:
    """Step 3: teacher scores for `train_file` with the LM `beir.teacher.lm`; returns the scored file (or
    `train_file` itself when there is no teacher). Reused when the input and the teacher settings are unchanged;
    an interrupted scoring run resumes from its cached parts."""
    from embedder.scoring.run import run_score

    teacher = cfg.beir.get("teacher") or {}
    if not teacher.get("lm"):
        return train_file
    folder = os.path.join(out_dir, f"score-{teacher.lm}")
    overrides = [f"lm={teacher.lm}", f"input_data={train_file}", f"output_dir={folder}",
                 f"default_record_kind={cfg.default_record_kind}",
                 f"max_candidates={int(teacher.max_candidates)}", f"batch_size={int(teacher.batch_size)}"]
    score_cfg = compose("score", overrides)
    key = fingerprint(_stat_key([train_file]), OmegaConf.to_container(score_cfg, resolve=True))
    stats_path = os.path.join(folder, "scored.stats.json")
    stats = _step_done(stats_path, key)
    if stats:
        log.info("beir: candidates already scored by %s (%s); reusing them", teacher.lm, stats["output"])
        return stats["output"]
    if os.path.isfile(stats_path):
        log.info("beir: the candidates or the teacher changed since %s was scored; scoring again", folder)
        shutil.rmtree(folder)  # this step's own folder: the stale scores and their part cache
    (result,) = run_score(score_cfg)["files"]  # an interrupted run (no stats yet) resumes from its parts
    write_json(stats_path, {"key": key, "output": result["output"], "records": result.get("records")})
    log.info("beir: %s scored the candidates of %s -> %s", teacher.lm, train_file, result["output"])
    return result["output"]


def prepare_beir_run(cfg: DictConfig) -> DictConfig:
    """Steps 1 and 2 for `cfg.beir.folder`; sets `train_data` and the `eval` sets (dev, and test when present).

    One process prepares: with Lightning's DDP launcher, rank 0 does it before it starts the other ranks; under
    torchrun or SLURM (all ranks started at once) the other ranks wait for rank 0's `data/run.json`. Two separate
    runs on one output folder take turns (a file lock in `<output_dir>/.locks`) and the second reuses the files."""
    from filelock import FileLock

    from embedder.distributed import as_single_process, launched_rank, launched_world_size

    b = cfg.beir
    data_dir = os.path.join(cfg.output_dir, "data")
    run_path = os.path.join(data_dir, "run.json")
    key = fingerprint(OmegaConf.to_container(b, resolve=True), OmegaConf.to_container(cfg.model, resolve=True),
                      cfg.query_max_length, cfg.key_max_length)
    if launched_world_size() > 1 and launched_rank() > 0:
        run = _wait_for_rank0(run_path, key)
    else:
        os.makedirs(os.path.join(cfg.output_dir, ".locks"), exist_ok=True)
        lock = FileLock(os.path.join(cfg.output_dir, ".locks", "beir-prepare.lock"))
        try:
            lock.acquire(timeout=0)
        except TimeoutError:
            log.info("beir: another process is preparing %s; waiting for it, then reusing its files", data_dir)
            lock.acquire()
        try:
            with as_single_process():  # mining and scoring must not wait for ranks that are waiting for this one
                prepared = prepare_beir(str(b.folder), data_dir, b.train_split, b.dev_split, b.test_split,
                                        float(b.dev_fraction), int(b.seed), str(b.eval_set.key_template))
                train_file = score_candidates(cfg, mine_negatives(cfg, prepared, data_dir), data_dir)
            run = {"key": key, "train_file": train_file, "paths": prepared["paths"]}
            write_json(run_path, run)
        finally:
            lock.release()
    template = OmegaConf.to_container(b.eval_set, resolve=True)
    eval_sets = {}
    for role in b.get("eval_splits") or []:
        if role not in ("dev", "test"):
            raise DataError(f"{role!r} is not a prepared split", field="beir.eval_splits", hint="use dev and/or test")
        if role in run["paths"]:
            eval_sets[role] = {**template, "eval_data": run["paths"][role], "corpus": run["paths"]["corpus"],
                               "during_fit": role == "dev" or bool(b.get("test_during_fit", False))}
    with open_dict(cfg):
        cfg.train_data = [run["train_file"]]
        teacher = b.get("teacher") or {}
        if teacher.get("lm"):  # the scored file's teacher_scores are distilled
            cfg.record_kinds[cfg.default_record_kind].loss.distill_weight = float(teacher.distill_weight)
        cfg.eval = OmegaConf.merge(OmegaConf.create(eval_sets), cfg.get("eval") or {})
    return cfg


def _wait_for_rank0(run_path: str, key: str, poll_s: float = 5.0) -> dict[str, Any]:
    """Rank > 0 of a torchrun/SLURM launch: wait until rank 0 has prepared this run's data (a line every minute)."""
    import time

    start = last = time.monotonic()
    while True:
        if os.path.isfile(run_path):
            run = read_json(run_path)
            if run.get("key") == key:
                return run
        if time.monotonic() - last >= 60:
            log.info("beir: waiting for rank 0 to prepare %s (%.0f min so far)", os.path.dirname(run_path),
                     (time.monotonic() - start) / 60)
            last = time.monotonic()
        time.sleep(poll_s)
