"""Read and check a corpus and a query file for retrieval (mining or evaluation), before any model work.

Corpus: one JSON object per line; row i is document i (the reference convention). Its text is
`key_template.format(**record)`. An `id`, `_id` or `docid` field, when present, must be unique.

Queries: one JSON object per line with a non-empty `query`; `pos_index` (corpus rows), `pos` (texts) and `answers`
are optional. Bad records raise `DataError` naming file, line and field; with `skip_bad=True` they are skipped
instead, counted by reason, and the first few are logged with their lines.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from embedder.data.jsonl import iter_jsonl
from embedder.errors import DataError

log = logging.getLogger("embedder.mining")

ID_FIELDS = ("id", "_id", "docid")
_SHOW_SKIPPED = 5  # skipped records logged one by one before the log only counts them


@dataclass
class Corpus:
    """Formatted corpus texts (row i = document i) and, when the file has them, the documents' own ids."""

    path: str
    texts: list[str]
    ids: list[str] | None = None
    _fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """A hash of every text (identifies the corpus in index and cache folder names)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            for t in self.texts:
                h.update(t.encode("utf-8", "surrogatepass"))
                h.update(b"\x00")
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def format_key(record: dict[str, Any], key_template: str, path: str | None, line: int | None) -> str:
    """`key_template.format(**record)`, with a DataError naming the missing field."""
    try:
        return key_template.format(**{k: ("" if v is None else v) for k, v in record.items()})
    except KeyError as e:
        name = e.args[0]
        raise DataError(f"corpus record has no field '{name}', which key_template {key_template!r} needs "
                        f"(fields present: {sorted(record)})", path=path, line=line, field=name,
                        hint="set key_template to the corpus's fields, e.g. key_template='{text}'") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"key_template {key_template!r} is not a valid format string: {e}") from None


def load_corpus(path: str, key_template: str = "{title} {text}") -> Corpus:
    """Read a corpus file: every line formatted with `key_template`; duplicate ids are an error."""
    texts: list[str] = []
    ids: list[str] = []
    id_field: str | None = None
    seen: dict[str, int] = {}
    for line, record in iter_jsonl(path):
        texts.append(format_key(record, key_template, path, line))
        if id_field is None and len(texts) == 1:
            id_field = next((f for f in ID_FIELDS if f in record), None)
        if id_field is not None:
            if id_field not in record:
                raise DataError(f"corpus record has no '{id_field}' although earlier records do", path=path,
                                line=line, field=id_field, hint="give every document an id, or none")
            doc_id = str(record[id_field])
            if doc_id in seen:
                raise DataError(f"duplicate document id {doc_id!r} (first on line {seen[doc_id]})", path=path,
                                line=line, field=id_field,
                                hint="document ids must be unique; remove or rename the repeated document")
            seen[doc_id] = line
            ids.append(doc_id)
    if not texts:
        raise DataError("the corpus is empty", path=path,
                        hint="one JSON object per line, e.g. {\"title\": .., \"text\": ..}")
    return Corpus(path=path, texts=texts, ids=ids if id_field is not None else None)


@dataclass
class QueryRecord:
    line: int
    row: int  # 0-based position among all records of the file (the reference's default query id)
    record: dict[str, Any]
    query: str
    pos_index: list[int] = field(default_factory=list)
    pos: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def query_id(self) -> Any:
        return self.record.get("query_id", self.record.get("qid", self.row))


@dataclass
class QueryFile:
    path: str
    records: list[QueryRecord]
    total: int
    skipped: Counter = field(default_factory=Counter)

    def report(self) -> str:
        if not self.skipped:
            return f"{self.path}: {self.total} records, none skipped"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.path}: {self.total} records, {sum(self.skipped.values())} skipped ({reasons})"


def load_queries(path: str, corpus_size: int | None = None, skip_bad: bool = False) -> QueryFile:
    """Read a query file for mining or evaluation and check every record against the corpus size."""
    out: list[QueryRecord] = []
    skipped: Counter = Counter()
    total = 0
    for row, (line, rec) in enumerate(iter_jsonl(path)):
        total += 1
        try:
            out.append(_check_query(rec, path, line, row, corpus_size))
        except DataError as e:
            if not skip_bad:
                raise
            reason = getattr(e, "reason", "bad record")
            skipped[reason] += 1
            if sum(skipped.values()) <= _SHOW_SKIPPED:
                log.warning("skipped: %s", str(e).splitlines()[0])
    result = QueryFile(path=path, records=out, total=total, skipped=skipped)
    if skipped:
        log.warning("%s", result.report())
    if not out:
        raise DataError("no usable records" + (f" ({result.report()})" if skipped else ""), path=path)
    return result


def _fail(message: str, reason: str, **kw: Any) -> DataError:
    err = DataError(message, **kw)
    err.reason = reason  # type: ignore[attr-defined]
    return err


def _check_query(rec: dict[str, Any], path: str, line: int, row: int, corpus_size: int | None) -> QueryRecord:
    text = rec.get("query")
    if not isinstance(text, str) or not text.strip():
        problem = "is missing" if text is None else "is empty" if isinstance(text, str) else \
            f"must be a string, got {type(text).__name__}"
        raise _fail(f"query {problem}", "empty query", path=path, line=line, field="query",
                    hint="every record needs a non-empty 'query' string (or pass skip_bad_records=true)")
    pos_index = rec.get("pos_index")
    if pos_index is None:
        pos_index = []
    elif isinstance(pos_index, int) and not isinstance(pos_index, bool):
        pos_index = [pos_index]
    if not isinstance(pos_index, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in pos_index):
        raise _fail(f"pos_index must be a list of integers, got {pos_index!r}"[:200], "malformed pos_index",
                    path=path, line=line, field="pos_index")
    if corpus_size is not None:
        bad = [i for i in pos_index if not 0 <= i < corpus_size]
        if bad:
            raise _fail(f"pos_index {bad} outside the corpus ({corpus_size} documents, rows 0..{corpus_size - 1})",
                        "pos_index outside the corpus", path=path, line=line, field="pos_index",
                        hint="pos_index holds 0-based row numbers of the corpus file; check that the two files "
                             "belong together")
    pos = rec.get("pos") or []
    if not isinstance(pos, list) or not all(isinstance(p, str) for p in pos):
        raise _fail("pos must be a list of strings", "malformed pos", path=path, line=line, field="pos")
    answers = rec.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _fail("answers must be a list of strings", "malformed answers", path=path, line=line, field="answers")
    return QueryRecord(line=line, row=row, record=rec, query=text, pos_index=list(pos_index), pos=list(pos),
                       answers=list(answers))
