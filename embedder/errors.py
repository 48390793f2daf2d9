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


_HUB_ID = r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$"  # huggingface_hub's repo id shape: name or namespace/name


class ModelLoadErrors:
    """Around `from_pretrained`: a model that cannot be found or fetched becomes one DataError that names it and the
    likely cause (a missing local path, offline and not cached, gated, or a wrong name), not a Hub traceback."""

    def __init__(self, name: str, setting: str = "model_name_or_path"):
        self.name, self.setting = str(name), setting

    def __enter__(self):
        import os
        import re

        name = self.name
        if not os.path.exists(name) and (name.startswith((".", "/", "~")) or not re.match(_HUB_ID, name)):
            raise DataError("this local path does not exist, and it is not a valid Hub id (namespace/name)",
                            path=name, field=self.setting,
                            hint="fix the path, or give a Hub id such as BAAI/bge-base-en")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, DataError) or not isinstance(exc, (OSError, ValueError)):
            return False
        try:
            from huggingface_hub.errors import (
                GatedRepoError,
                HFValidationError,
                LocalEntryNotFoundError,
                RepositoryNotFoundError,
            )
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            return False
        chain, e = [], exc
        while e is not None and len(chain) < 8:
            chain.append(e)
            e = e.__cause__ or e.__context__
        text = " ".join(str(x) for x in chain).lower()
        kinds = tuple(type(x) for x in chain)
        name, field = self.name, self.setting
        if any(issubclass(k, GatedRepoError) for k in kinds) or "gated" in text:
            msg, hint = "the model is gated on the Hugging Face Hub", (
                "accept its license on its Hub page, then `hf auth login` or set HF_TOKEN")
        elif any(issubclass(k, HFValidationError) for k in kinds):
            msg, hint = "not a local folder and not a valid Hub id", "fix the path or the Hub id"
        elif any(issubclass(k, LocalEntryNotFoundError) for k in kinds) or "offline" in text or \
                "couldn't connect" in text or "cannot find the requested files in the" in text:
            msg, hint = "the model is not in the local cache and the Hub cannot be reached", (
                "download it where there is a network (`hf download " + name + "`) and point "
                + field + " at the folder, or check HF_HUB_OFFLINE / HF_HOME")
        elif any(issubclass(k, RepositoryNotFoundError) for k in kinds) or "is not a local folder" in text or \
                "not a valid model identifier" in text:
            msg, hint = "no such model: not a local folder, and not found on the Hub", (
                "check the spelling; for a private model, log in (`hf auth login`) or set HF_TOKEN")
        else:
            return False
        raise DataError(f"cannot load the model ({msg})", path=name, field=field, hint=hint) from None


def _reportable(exc: BaseException | None) -> BaseException | None:
    """The user-facing error in `exc` or its causes (Hydra's instantiate wraps what a constructor raised)."""
    import errno

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (DataError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            return exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


def _is_stop(exc: BaseException) -> bool:
    """A stop on SIGTERM: ours (embedder.stopping), or Lightning's at a batch boundary (SIGTERMException)."""
    from embedder.stopping import StopRequested

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, StopRequested) or type(exc).__name__ == "SIGTERMException":
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _message(exc: BaseException) -> str:
    import errno

    if isinstance(exc, DataError) or not isinstance(exc, OSError):
        return str(exc)
    where = exc.filename or "?"
    if isinstance(exc, PermissionError):
        return f"{where}: permission denied\n  -> make the folder writable, or point output_dir somewhere you can write"
    if isinstance(exc, NotADirectoryError):
        return f"{where}: a part of this path is a file, not a folder\n  -> choose another output_dir"
    if isinstance(exc, IsADirectoryError):
        return f"{where}: is a directory, not a file\n  -> give the path of a file inside it"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on the device while writing it\n  -> free space or point output_dir at a "
                f"larger disk, then run again: finished work is reused and earlier outputs were not replaced")
    if exc.errno == errno.EROFS:
        return f"{where}: the filesystem is read-only\n  -> point output_dir at a writable folder"
    return str(exc)


class ReportedInputErrors:
    """Entry points: show bad-input errors (DataError, a missing file or directory, a permission or disk-full error)
    as one clean message and exit 1, instead of a traceback through Hydra and Lightning. Programming errors keep
    their traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and _is_stop(exc):  # SIGTERM: one line, exit 143 (embedder.stopping)
            import sys

            from embedder.stopping import EXIT_STATUS

            print(f"stopped: {exc if str(exc) else 'stopped on SIGTERM'}; finished work is kept on disk (rerun to "
                  "reuse it; ckpt_path=last resumes training)", file=sys.stderr)
            raise SystemExit(EXIT_STATUS) from None
        found = _reportable(exc)
        if found is not None:
            import sys

            print(f"error: {_message(found)}", file=sys.stderr)
            raise SystemExit(1) from None
        return False


model_load_errors = ModelLoadErrors  # the old spellings, kept for one release
reported_input_errors = ReportedInputErrors
