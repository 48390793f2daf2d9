"""Read and write JSON-lines files with errors that name the file and line, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from embedder.errors import DataError


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, record)` for every non-blank line; line numbers are 1-based."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=lineno,
                                hint="each line must be one JSON object (JSON-lines); fix or delete this line") from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=lineno,
                                hint="each line must be one JSON object such as {\"query\": ..., \"pos\": [...]}")
            yield lineno, record


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path)]


@contextlib.contextmanager
def atomic_open(path: str, suffix: str = ".tmp") -> Iterator[IO[str]]:
    """Open a temp file beside `path` for writing; on success fsync it and rename it over `path`.

    A crash leaves either the old file or the complete new one, never a half-written file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines to `path` atomically; returns how many were written."""
    n = 0
    with atomic_open(path, suffix=".jsonl") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
