"""Resolve the reference's `llm-embedder:` data paths and file globs.

`llm-embedder:qa/nq/train.json` means `<data_root>/qa/nq/train.json`, exactly as in the reference's
`resolve_path`. Plain paths and globs are accepted too, with or without the prefix.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from embedder.errors import DataError

PREFIX = "llm-embedder:"


def resolve_path(path: str, data_root: str | None) -> str:
    """Turn `llm-embedder:X` into `data_root/X`; leave other paths alone (but expand `~`)."""
    path = str(path)
    if path.startswith(PREFIX):
        if not data_root:
            raise FileNotFoundError(f"'{path}' uses the '{PREFIX}' prefix but no data_root is set; "
                                    f"pass data_root=/path/to/llm-embedder")
        path = os.path.join(str(data_root), path[len(PREFIX):])
    return os.path.expanduser(path)


def resolve_files(paths: str | Iterable[str] | None, data_root: str | None, what: str = "file",
                  allow_dirs: bool = False) -> list[str]:
    """Resolve a list of paths or globs to existing files, keeping order and repeats.

    Repeats are kept on purpose: the reference lists `tool/toolbench/train.json` twice to double its weight.
    A missing file raises FileNotFoundError that shows what the prefix resolved to. `allow_dirs`: a folder counts
    too (a corpus given as a folder of parquet shards), and a missing `<name>.json` falls back to the folder
    `<name>` beside it: the reference saves the QReCC corpus as `corpus.json`, `embedder.data.download
    qrecc-corpus` as parquet shards in `corpus/`, and `corpus: .../corpus.json` reads whichever is there.
    """
    if paths is None:
        return []
    if isinstance(paths, str):
        paths = [paths]
    out: list[str] = []
    for raw in paths:
        resolved = resolve_path(raw, data_root)
        if any(ch in resolved for ch in "*?["):
            matches = sorted(glob.glob(resolved))
            if not matches:
                raise FileNotFoundError(_missing_message(raw, resolved, data_root, what, glob_pattern=True))
            out.extend(matches)
        elif os.path.isfile(resolved) or (allow_dirs and os.path.isdir(resolved)):
            out.append(resolved)
        elif allow_dirs and resolved.endswith(".json") and os.path.isdir(resolved[:-len(".json")]):
            out.append(resolved[:-len(".json")])  # the parquet shards' folder beside the missing corpus.json
        elif os.path.isdir(resolved):
            raise DataError(f"{what} '{raw}' is a directory, not a file", path=resolved,
                            hint=f"point {what} at a JSON-lines file inside it, or at a glob such as {resolved}/*.json")
        else:
            msg = _missing_message(raw, resolved, data_root, what)
            if allow_dirs and resolved.endswith(".json"):
                msg = msg.replace(". Check the path", f", nor a folder of parquet shards at {resolved[:-len('.json')]!r}"
                                                     ". Check the path", 1)
            raise FileNotFoundError(msg)
    return out


def _missing_message(raw: str, resolved: str, data_root: str | None, what: str, glob_pattern: bool = False) -> str:
    kind = "no file matches the glob" if glob_pattern else "file not found"
    msg = f"{what} {raw!r}: {kind}"
    if str(raw).startswith(PREFIX):
        msg += f" (the '{PREFIX}' prefix resolved it to {resolved!r} with data_root={data_root!r})"
    elif resolved != raw:
        msg += f" (resolved to {resolved!r})"
    msg += ". Check the path, or set data_root=<folder holding qa/, chat/, tool/, ...>."
    return msg


def is_beir_folder(path: str) -> bool:
    """True for a BEIR folder: `corpus.jsonl`, `queries.jsonl` and a `qrels/` folder."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "corpus.jsonl"))
            and os.path.isfile(os.path.join(path, "queries.jsonl")) and os.path.isdir(os.path.join(path, "qrels")))
