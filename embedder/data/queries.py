"""Query files for mining and evaluation: checked in one streamed pass, then read lazily by byte offset.

Each record is checked by the data contract (`records.check_query_record`). A bad record stops the run with file,
line and field, or, with `skip_bad=True`, is skipped and counted by reason. Only the kept records' byte offsets
stay in memory, so mining a 500k-record training file does not hold its records (tens of GB of JSON) in memory.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from embedder.data.jsonl import JsonlRecords, LazyView, iter_jsonl_offsets
from embedder.data.records import QueryRecord, SkipCounter, check_query_record
from embedder.errors import DataError, no_records_error

log = logging.getLogger(__name__)


@dataclass
class QueryFile:
    """The kept records of a query file: `len`, iteration and `[i]` give checked `QueryRecord`s, read on access."""

    path: str
    offsets: np.ndarray  # (N,) int64 byte offset of each kept record
    lines: np.ndarray  # (N,) int64 its line number
    rows: np.ndarray  # (N,) int64 its 0-based position among all records (the default query id)
    total: int
    skipped: Counter
    corpus_size: int | None = None

    def __post_init__(self) -> None:
        self._records = JsonlRecords(self.path, self.offsets, self.lines)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> QueryRecord:
        return check_query_record(self._records[i], self.path, int(self.lines[i]), int(self.rows[i]),
                                  self.corpus_size)

    def __iter__(self) -> Iterator[QueryRecord]:
        return (self[i] for i in range(len(self)))

    @property
    def records(self) -> QueryFile:
        """The file itself: it is the sequence of records."""
        return self

    @property
    def queries(self) -> Sequence[str]:
        """The query texts, in record order (read on access)."""
        return LazyView(len(self), lambda i: self[i].query)

    def report(self) -> str:
        skips = SkipCounter(self.path, self.skipped)
        if not skips.total:
            return f"{self.path}: {self.total} records, none skipped"
        return f"{self.path}: {self.total} records, {skips.total} skipped ({skips.summary()})"


def load_queries(path: str, corpus_size: int | None = None, skip_bad: bool = False) -> QueryFile:
    """Check every record of a query file (streamed) against the contract and the corpus size."""
    offsets, lines, rows = array("q"), array("q"), array("q")
    skips = SkipCounter(path)
    total = 0
    for row, (line, offset, rec) in enumerate(iter_jsonl_offsets(path, progress=f"checking {path}")):
        total += 1
        try:
            check_query_record(rec, path, line, row, corpus_size)
        except DataError as e:
            if not skip_bad:
                raise
            skips.skip(e)
            continue
        offsets.append(offset)
        lines.append(line)
        rows.append(row)
    def as_np(a) -> np.ndarray:
        return np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)

    result = QueryFile(path, as_np(offsets), as_np(lines), as_np(rows), total, skips.skipped, corpus_size)
    if skips.total:
        log.warning("%s", result.report())
    if not len(result):
        raise no_records_error(path, "usable records", result.report() if skips.total else "")
    return result
