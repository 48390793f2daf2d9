"""Unpacking safely: archive members that would land outside the target are refused, and files are moved in place
only once complete."""


from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from embedder.atomic import atomic_open
from embedder.data.download.hub import CountingReader, discard
from embedder.data.download.sources import RESUME_HINT, TASK_DIRS, DownloadError, UnsafeArchiveError
from embedder.progress import Progress

log = logging.getLogger(__name__)


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a member that would write outside the target folder, or that is not a file, folder or link."""
    name = member.name.replace("\\", "/")
    why = None
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        why = "it has an absolute path"
    elif ".." in PurePosixPath(name).parts:
        why = "its path contains '..'"
    elif member.isdev():  # character or block device, FIFO
        why = "it is a device file or FIFO"
    elif member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        # a symlink is relative to its own folder, a hard link to the archive root
        base = PurePosixPath(name).parent if member.issym() else PurePosixPath(".")
        resolved = os.path.normpath(str(base / link))
        if link.startswith("/") or (len(link) > 1 and link[1] == ":") or resolved == ".." or \
                resolved.startswith("../"):
            why = f"it is a {'symlink' if member.issym() else 'hard link'} to {member.linkname!r}, outside the archive"
    elif not (member.isfile() or member.isdir()):
        why = "it is not a regular file, folder or link"
    if why:
        raise UnsafeArchiveError(f"refusing to extract member {member.name!r}: {why}",
                                 hint="the archive is corrupt or not the expected one; nothing of it was moved "
                                      "into the target folder")


_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4


_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # `except ()` catches nothing where filters do not exist


def extract_archive(archive: Path, dest: Path, label: str) -> None:
    """Stream-extract a tar archive into the (new, empty) folder `dest`, checking every member first."""
    with open(archive, "rb") as raw, Progress(f"extracting {label}", archive.stat().st_size, quiet_below=0, logger=log) as bar:
        try:
            with tarfile.open(fileobj=CountingReader(raw, bar.update), mode="r|*") as tar:
                for member in tar:
                    check_member(member)
                    try:
                        tar.extract(member, dest, **_FILTER)
                    except _FILTER_ERROR as e:
                        raise UnsafeArchiveError(f"refusing to extract member {member.name!r}: {e}",
                                                 hint="the archive is corrupt or not the expected one") from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DownloadError(f"{archive} is not a readable tar archive ({e})",
                                hint=f"delete {archive} and rerun the same command to download it again") from None


def content_root(folder: Path) -> Path:
    """`folder`, or its single subfolder when that wraps the task folders (`llm-embedder/qa/...`)."""
    entries = [e for e in folder.iterdir() if e.name != "__MACOSX" and not e.name.startswith("._")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() and entries[0].name not in TASK_DIRS \
            and any((entries[0] / t).is_dir() for t in TASK_DIRS):
        log.info("the archive wraps everything in %s/; stripping it", entries[0].name)
        return entries[0]
    return folder


def move_tree(src: Path, root: Path) -> list[dict[str, Any]]:
    """Move every file and link under `src` to the same relative path under `root` (merging into existing folders).

    Returns `[{"path", "size"}]` of the regular files, relative to `root`, sorted.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]  # os.walk lists links to folders here
        for name in sorted(filenames + links):
            s, rel = Path(dirpath) / name, rel_dir / name
            d = root / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            if d.is_dir() and not d.is_symlink():
                raise DownloadError(f"cannot place {rel}: {d} is a folder", hint=f"move {d} away and rerun")
            if d.is_symlink() or s.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    d.unlink()
            os.replace(s, d)
            if not d.is_symlink():
                files.append({"path": rel.as_posix(), "size": d.stat().st_size})
        dirnames[:] = [x for x in dirnames if x not in links]
    return sorted(files, key=lambda e: e["path"])


def common_folder(paths: list[str]) -> tuple[str, ...]:
    """The folder parts all the Hub paths share (`("data",)` for `data/train-0000*.parquet`)."""
    common: list[str] = []
    for parts in zip(*(PurePosixPath(p).parent.parts for p in paths)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return tuple(common)


def move_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    with contextlib.suppress(FileNotFoundError):
        src.with_name(src.name + ".verified").unlink()


def gunzip_atomic(src: Path, dest: Path) -> None:
    """Decompress `src` to a temp file beside `dest`, then rename it into place (never a half-written `dest`)."""
    try:
        with open(src, "rb") as raw, \
                Progress(f"decompressing {src.name}", src.stat().st_size, quiet_below=0, logger=log) as bar, \
                gzip.open(CountingReader(raw, bar.update)) as zin, \
                atomic_open(str(dest), suffix=dest.suffix, binary=True) as out:
            shutil.copyfileobj(zin, out, 1 << 22)
    except (OSError, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a disk error: reported by main
        discard(src)
        raise DownloadError(f"{src} is not a valid gzip file ({e}); deleted it", hint=RESUME_HINT) from None
