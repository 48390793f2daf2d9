"""BEIR / MTEB retrieval folders: load them directly, or convert them to this project's formats.

A BEIR folder (as downloaded from the BEIR site or the `mteb/<name>` Hub datasets) holds::

    corpus.jsonl      {"_id": "4983", "title": "...", "text": "..."}        one document per line
    queries.jsonl     {"_id": "1", "text": "..."}                           one query per line
    qrels/test.tsv    query-id <TAB> corpus-id <TAB> score, with a header line (also dev.tsv, train.tsv)

`load_beir(folder, split)` returns the corpus in row order (row i = document i, read on access; its BEIR ids in
`corpus.ids`) and the
queries of that split as eval records: `query_id`, `query`, `pos_index` (rows with score > 0) and `pos_relevance`
(their graded scores). Queries that have no qrels in the split are left out, as BEIR and MTEB do.
`convert_beir(folder, out_dir, split)` writes the same as `corpus.json` and `<split>.json`, so every entry point
(`train.py` eval sets, `embedder.evaluate`, `mine.py`) can use it:

    python -m embedder.data.beir /data/beir/scifact /data/beir-converted/scifact --split test

`prepare_beir(folder, out_dir, ...)` is the first step of `task=beir` (embedder/recipes/beir.py): the folder's
train/dev/test splits as this project's training and eval records (a dev split held out when there is none).

Graded relevance: `ndcg` over records that carry `pos_relevance` with grades other than 1 is the graded nDCG of
trec_eval's `ndcg_cut` (gain = grade), which is what BEIR and MTEB report; `metrics.graded_ndcg` computes it, and the
RetrievalEvaluator uses it wherever records carry grades (in training and in `embedder.evaluate` alike).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedder.atomic import read_json, write_json
from embedder.data.corpus import Corpus, open_corpus
from embedder.data.jsonl import iter_jsonl, write_jsonl_atomic
from embedder.data.records import format_key
from embedder.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class BeirData:
    """A BEIR split in this project's terms. The corpus is read on access (`embedder.data.corpus`), not loaded."""

    folder: str
    split: str
    corpus: Corpus  # formatted texts (key_template, stripped), row i = document i; `corpus.ids` = BEIR `_id`s
    queries: list[dict[str, Any]]  # {"query_id", "query", "pos_index", "pos_relevance"}
    skipped: Counter = field(default_factory=Counter)

    @property
    def doc_ids(self) -> Sequence[str]:
        return self.corpus.ids


def _str_field(rec: dict, name: str, path: str, line: int, required: bool = True) -> str:
    value = rec.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, (str, int)) or (isinstance(value, str) and required and name == "_id" and not value):
        raise DataError(f"'{name}' must be a string, got {value!r}"[:200], path=path, line=line, field=name)
    return str(value)


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """`{query id: {doc id: grade}}` from a BEIR qrels TSV (header line optional, 3 or 4 columns)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # the header
            if len(row) == 4:  # TREC style: qid 0 docid grade
                row = [row[0], row[2], row[3]]
            if len(row) != 3:
                raise DataError(f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}",
                                path=path, line=lineno)
            qid, did, score = (c.strip() for c in row)
            try:
                grade = int(float(score))
            except ValueError:
                raise DataError(f"score {score!r} is not a number", path=path, line=lineno, field="score") from None
            qrels.setdefault(qid, {})[did] = grade
    return qrels


def load_beir(folder: str, split: str = "test", key_template: str = "{title} {text}") -> BeirData:
    """Read a BEIR folder's corpus, queries and `qrels/<split>.tsv` (see the module docstring).

    The corpus texts are `key_template` over the corpus fields, stripped (an empty title leaves no leading space).
    """
    corpus_path, queries_path = os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl")
    qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
    for p in (corpus_path, queries_path, qrels_path):
        if not os.path.isfile(p):
            qrels_dir = os.path.join(folder, "qrels")
            have = sorted(os.listdir(qrels_dir)) if os.path.isdir(qrels_dir) else []
            raise FileNotFoundError(f"BEIR folder {folder!r}: {p!r} not found" +
                                    (f" (qrels splits present: {have})" if p == qrels_path else ""))
    # The corpus is checked (every line, unique `_id`s) and indexed by open_corpus; only the ids the qrels name are
    # mapped to rows, so memory follows the qrels, not the corpus (MS MARCO: 8.8M documents).
    corpus = open_corpus(corpus_path, key_template, strip=True, defaults={"title": "", "text": ""})
    if corpus.id_field != "_id":
        raise DataError("BEIR corpus records need an '_id'", path=corpus_path, line=1, field="_id",
                        hint="a BEIR corpus line looks like {\"_id\": \"4983\", \"title\": ..., \"text\": ...}")
    qrels = read_qrels(qrels_path)
    wanted = {did for docs in qrels.values() for did in docs}
    row_of: dict[str, int] = {}
    for row, (line, rec) in enumerate(iter_jsonl(corpus_path)):
        did = _str_field(rec, "_id", corpus_path, line)
        if did in wanted:
            row_of[did] = row
    query_text: dict[str, tuple[int, str]] = {}
    for line, rec in iter_jsonl(queries_path):
        qid = _str_field(rec, "_id", queries_path, line)
        if qid in query_text:
            raise DataError(f"duplicate query id {qid!r} (first on line {query_text[qid][0]})", path=queries_path,
                            line=line, field="_id")
        query_text[qid] = (line, _str_field(rec, "text", queries_path, line, required=False))

    skipped: Counter = Counter()
    queries = []
    for qid, docs in qrels.items():  # qrels order, like BEIR
        if qid not in query_text:
            skipped["qrels query not in queries.jsonl"] += 1
            continue
        line, text = query_text[qid]
        if not text.strip():
            raise DataError("query text is empty", path=queries_path, line=line, field="text")
        pos, rel = [], []
        for did, grade in docs.items():
            if did not in row_of:
                skipped["qrels document not in corpus.jsonl"] += 1
                continue
            if grade > 0:
                pos.append(row_of[did])
                rel.append(grade)
        if not pos:
            skipped["query without a relevant document"] += 1
            continue
        queries.append({"query_id": qid, "query": text, "pos_index": pos, "pos_relevance": rel})
    if skipped:
        log.warning("%s (%s): %s", folder, split, ", ".join(f"{n} {why}" for why, n in skipped.items()))
    if not queries:
        raise DataError(f"no query of split {split!r} has a relevant document in the corpus", path=qrels_path)
    return BeirData(folder=folder, split=split, corpus=corpus, queries=queries, skipped=skipped)


def convert_beir(folder: str, out_dir: str, split: str = "test") -> dict[str, str]:
    """Write `corpus.json` and `<split>.json` (this project's formats) under `out_dir`; returns their paths."""
    data = load_beir(folder, split)
    corpus_out, eval_out = os.path.join(out_dir, "corpus.json"), os.path.join(out_dir, f"{split}.json")
    corpus_path = os.path.join(folder, "corpus.jsonl")

    def documents():  # streamed: row i of the output is row i of the BEIR corpus
        for line, rec in iter_jsonl(corpus_path):
            yield {"id": _str_field(rec, "_id", corpus_path, line),
                   "title": _str_field(rec, "title", corpus_path, line, required=False),
                   "text": _str_field(rec, "text", corpus_path, line, required=False)}

    n_docs = write_jsonl_atomic(corpus_out, documents())
    write_jsonl_atomic(eval_out, data.queries)
    log.info("converted %s: %d documents -> %s, %d %s queries -> %s", folder, n_docs, corpus_out,
             len(data.queries), split, eval_out)
    return {"corpus": corpus_out, "eval_data": eval_out}


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


def stat_key(paths: list[str | None]) -> list[Any]:
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
    key = {"version": PREPARE_VERSION, "files": stat_key(list(inputs.values())), "dev_fraction": dev_fraction,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a BEIR folder to embedder's corpus.json + <split>.json")
    parser.add_argument("folder", help="BEIR folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    parser.add_argument("out_dir", help="where to write corpus.json and <split>.json")
    parser.add_argument("--split", default="test", help="qrels split (test, dev, train)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = convert_beir(args.folder, args.out_dir, args.split)
    print(f"corpus={paths['corpus']} eval_data={paths['eval_data']}")


if __name__ == "__main__":
    main()
