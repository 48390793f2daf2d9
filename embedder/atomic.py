"""Atomic writes: the one writer for files (`atomic_path`, `atomic_open`, `write_json`, read back by `read_json`),
the one for folders (`atomic_dir`), and the export swap (`staged_export`). A crash, a kill or a full disk leaves the
old output or the complete new one, never a half-written one; temp names start with "." beside the target.

The export swap publishes a folder of files (a model export) into a folder that holds other things too
(checkpoints, metrics). Hand-written because no library swaps a set of files into a shared folder: the new export is written completely
into a temp folder beside the target first (a full disk or a crash fails there, touching nothing), and only then
renamed in, entry by entry. Renames within one filesystem need no space and cannot fail half-way through a file,
so the folder holds the old export or the new one, never a mix of old and new files; the old export's entries the
new one lacks are removed last. `.export-manifest.json` lists what the last export wrote.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

MANIFEST = ".export-manifest.json"


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temp path beside `path` to write (by name: `np.save`, `faiss.write_index`, ...); renamed over `path` when
    the block succeeds, removed when it fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file normal permissions
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty final file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, suffix: str = ".tmp", binary: bool = False) -> Iterator[IO[Any]]:
    """`open` a temp file beside `path` for writing (text UTF-8, or `binary`); renamed over `path` on success."""
    with atomic_path(path, suffix) as tmp:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            yield f


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """`obj` as JSON at `path`, atomically."""
    with atomic_open(path, suffix=".json") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, default=str)


def read_json(path: str, what: str = "JSON file", hint: str = "delete it and run again; it is rebuilt") -> Any:
    """The JSON at `path`; a 0-byte or cut file (a full disk, a killed copy) is a DataError that names it and says
    how to rebuild it, not a bare JSONDecodeError."""
    from embedder.errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise DataError(f"corrupt {what} ({e})", path=path, hint=hint) from None


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """A temp folder beside `path` to fill; it replaces `path` (a previous folder is removed) when the block
    succeeds, and is removed when it fails."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TMP_PREFIX = ".export-tmp-"


def staging_folder(out_dir: str) -> str:
    """A fresh temp folder inside `out_dir` for this process; temp folders of killed runs are removed."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, TMP_PREFIX + "*")) + glob.glob(os.path.join(out_dir, ".export-old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}{os.getpid()}")
    os.makedirs(tmp)
    return tmp


def publish_folder(tmp: str, out_dir: str) -> list[str]:
    """Move every entry of `tmp` into `out_dir` (replacing same-named ones), drop the previous export's other
    entries, write the manifest; returns the new entries."""
    new = sorted(os.listdir(tmp))
    old_path = os.path.join(out_dir, MANIFEST)
    try:
        with open(old_path, encoding="utf-8") as f:
            old = json.load(f)["entries"]
    except (OSError, ValueError, KeyError):
        old = []
    trash = os.path.join(out_dir, f".export-old-{os.getpid()}")
    os.makedirs(trash, exist_ok=True)
    for name in new:
        dest = os.path.join(out_dir, name)
        if os.path.isdir(dest) and not os.path.islink(dest):
            os.replace(dest, os.path.join(trash, name))  # a folder cannot be renamed over a non-empty folder
        os.replace(os.path.join(tmp, name), dest)
    for name in old:
        if name not in new and os.path.lexists(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(trash, name))
    write_json(old_path, {"entries": new}, indent=1)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return new


@contextlib.contextmanager
def staged_export(out_dir: str) -> Iterator[str]:
    """A staging folder to write an export into; published into `out_dir` when the block succeeds, removed when it
    fails (`out_dir` untouched)."""
    tmp = staging_folder(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, out_dir)
