"""One exception type for bad user input, so every message names file, line and field the same way."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message says where (file, line, field) and what to do about it."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None,
                 hint: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (": ".join([", ".join(where), message]) if where else message)
        if hint:
            text += f"\n  -> {hint}"
        super().__init__(text)
        self.path, self.line, self.field, self.hint = path, line, field, hint


def no_records_error(path: str, what: str = "records", detail: str = "") -> DataError:
    """The error for a file that gave nothing to work on; says when the file is simply empty."""
    import os

    empty = os.path.isfile(path) and os.path.getsize(path) == 0
    return DataError(f"no {what}" + (" (the file is empty)" if empty else "") + (f" ({detail})" if detail else ""),
                     path=path, hint="check that the file is non-empty JSON-lines, one object per line")


class reported_input_errors:
    """Entry points: show bad-input errors (DataError, a missing file) as one clean message and exit 1, instead of
    a traceback through Hydra and Lightning. Programming errors keep their traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, (DataError, FileNotFoundError)):
            import sys

            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        return False
