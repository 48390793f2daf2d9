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

    python -m embedder.evaluation.beir /data/beir/scifact /data/beir-converted/scifact --split test

Graded relevance: `ndcg` over records that carry `pos_relevance` with grades other than 1 is the graded nDCG of
trec_eval's `ndcg_cut` (gain = grade), which is what BEIR and MTEB report; `metrics.graded_ndcg` computes it, and the
RetrievalEvaluator uses it wherever records carry grades (in training and in `embedder.evaluate` alike).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from embedder.data.corpus import Corpus, open_corpus
from embedder.data.jsonl import iter_jsonl, write_jsonl_atomic
from embedder.errors import DataError

log = logging.getLogger("embedder.evaluation")


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
