"""Read and write JSON-lines files: errors that name the file and line, lazy record access, atomic writes."""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from embedder import stopping
from embedder.atomic import atomic_open
from embedder.errors import DataError
from embedder.progress import Progress

log = logging.getLogger(__name__)


def parse_line(raw: bytes, path: str, lineno: int | None) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path, line=lineno,
                        hint="save the file as UTF-8 JSON-lines") from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=lineno,
                        hint="each line must be one JSON object (JSON-lines); fix or delete this line") from None
    if isinstance(record, list):
        raise DataError("a JSON array, where each line must be one JSON object (JSON-lines)", path=path, line=lineno,
                        hint="convert it: jq -c '.[]' file.json > file.jsonl")
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=lineno,
                        hint="each line must be one JSON object such as {\"query\": ..., \"pos\": [...]}")
    return record


def iter_jsonl_offsets(path: str, progress: str | None = None, digest: Any = None,
                       allow_gzip: bool = False) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield `(line_number, byte_offset, record)` for every non-blank line (1-based lines), streaming.

    `allow_gzip`: a `.gz` file is decompressed on the way (for a single pass: its offsets are positions in the
    decompressed text, which `JsonlRecords` cannot seek to, so the offset readers refuse it). `progress`: a label; when set, progress with an ETA is shown for
    large files (by bytes read from disk). `digest`: a hashlib object that is fed every (decompressed) byte on the
    way (a content fingerprint without a second pass).
    """
    gz = path.endswith(".gz")
    if gz and not allow_gzip:
        raise DataError("a gzipped file is read by byte offset here, which gzip does not allow", path=path,
                        hint=f"decompress it once (gunzip -k {path}) and point to the .jsonl/.json file")
    bar = Progress(progress, os.path.getsize(path), logger=log) if progress else None
    offset = 0
    with open(path, "rb") as raw_file:
        f = gzip.GzipFile(fileobj=raw_file, mode="rb") if gz else raw_file
        bad_gzip = (gzip.BadGzipFile, EOFError, zlib.error) if gz else ()  # a truncated or corrupt .gz
        read_before, lineno = 0, 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines, None)
            except bad_gzip as e:
                raise DataError(f"not a readable gzip file ({e})", path=path, line=lineno + 1,
                                hint="download it again, or decompress it and point to the .jsonl") from None
            if raw is None:
                break
            lineno += 1
            if lineno % 65536 == 0:  # a 54M-line corpus takes minutes to stream: stop between lines on SIGTERM
                stopping.check(f"reading {path}")
            start, offset = offset, offset + len(raw)
            if digest is not None:
                digest.update(raw)
            if bar is not None:  # bytes from disk: the line's own (no syscall per line), or gzip's compressed input
                read_now = raw_file.tell() if gz else offset
                bar.update(read_now - read_before)
                read_before = read_now
            if not raw.strip():
                continue
            yield lineno, start, parse_line(raw, path, lineno)
    if bar is not None:
        bar.finish()


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, record)` for every non-blank line; line numbers are 1-based. `.gz` files are read
    through gzip."""
    for lineno, _, record in iter_jsonl_offsets(path, allow_gzip=True):
        yield lineno, record


class JsonlRecords(Sequence):
    """The records of a JSON-lines file at the given byte offsets, parsed on access (nothing else is held).

    Memory is the offsets (8 bytes per record, memory-mapped when they come from the index cache); the text stays
    in the OS page cache, which the ranks and DataLoader workers of a node share. Picklable: each process opens
    its own file handle.
    """

    def __init__(self, path: str, offsets: np.ndarray, lines: np.ndarray | None = None):
        self.path = path
        self.offsets = offsets  # (N,) int64: where record i's line starts
        self.lines = lines  # (N,) int64 its 1-based line number, for error messages (None: not kept)
        self._fh: IO[bytes] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def _file(self) -> IO[bytes]:
        if self._fh is None or self._pid != os.getpid():  # a forked worker gets its own handle
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        return self._fh

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        f = self._file()
        f.seek(int(self.offsets[i]))
        return parse_line(f.readline(), self.path, None if self.lines is None else int(self.lines[i]))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "offsets": self.offsets, "lines": self.lines}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["offsets"], state.get("lines"))


class LazyView(Sequence):
    """`get(i)` for i in `range(length)`, computed on access: a column of a lazily read file (query texts, ids)."""

    def __init__(self, length: int, get: Callable[[int], Any]):
        self.length, self.get = length, get

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self.length))]
        return self.get(i)


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines to `path` atomically; returns how many were written."""
    n = 0
    with atomic_open(path, suffix=".jsonl") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
