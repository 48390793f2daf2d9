"""Download the training and evaluation data from the Hugging Face Hub: `python -m embedder.data.download NAME`.

    python -m embedder.data.download llm-embedder --to /data/llm-embedder   # train.py data_root=/data/llm-embedder
    python -m embedder.data.download qrecc-corpus beir:scifact --to /data/llm-embedder
    python -m embedder.data.download llm-embedder --dry-run                  # what would be fetched; no network
    python -m embedder.data.download --list
    make data NAME=llm-embedder TO=/data/llm-embedder

Sources (NAME) and what lands under DIR (`--to`, default `$EMBEDDER_DATA`, else `./data/llm-embedder`):

- `llm-embedder`: `llm-embedder.tar.gz` (about 16.9 GB) from the dataset repo `namespace-Pt/projects`, unpacked so
  that DIR is the `data_root` the task configs read: `DIR/qa/msmarco/train.json`,
  `DIR/qa/nq/{train,dev,test,corpus}.json`, `DIR/convsearch/qrecc/{train.concat,test.concat}.json`,
  `DIR/chat/msc/train.json`, `DIR/lrlm/<name>/train.json`, `DIR/tool/toolbench/...`, `DIR/icl/icl/...`.
  A single top folder that wraps the task folders (`llm-embedder/qa/...`) is stripped. The reference names the
  QReCC folder both `convsearch/qrecc` and `conversation/qrecc`; when the archive only has `conversation/qrecc`,
  `DIR/convsearch/qrecc` is made a relative symlink to it (a copy where symlinks fail).
- `qrecc-corpus`: every `*.parquet` shard of the dataset repo `namespace-Pt/qrecc-corpus` (~54M passages) into
  `DIR/convsearch/qrecc/corpus/`, keeping the shards' names relative to their common folder. Corpus row i is the
  i-th row across the shards sorted by path, so do not add or rename shards there.
- `beir:<name>` (`beir:scifact`, `beir:nfcorpus`, `beir:fiqa`, ...): `corpus.jsonl.gz` and `queries.jsonl.gz` from
  `BeIR/<name>` and the `<split>.tsv` files of `BeIR/<name>-qrels`, as the BEIR folder `embedder.evaluation.beir`
  reads: `DIR/beir/<name>/corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.

Bookkeeping lives in `DIR/.embedder-download/`: `<name>.json` (`beir-scifact.json` for `beir:scifact`) is each
source's manifest and done-marker (the Hub files' size / sha256 / git oid, the files written and their sizes; for
`llm-embedder` also which QReCC folder the archive had); `hub/<name>/` holds the downloads (huggingface_hub resumes
a cut one; archives are deleted once unpacked unless `--keep-archive`); `extract-*` is the temporary folder an archive
is unpacked into before its files are moved in place, so a crash never leaves a tree that looks complete. A source
whose manifest is complete, whose files are all present and whose Hub files are unchanged is skipped: a rerun
downloads and extracts nothing (it asks the Hub for the files' metadata only, and goes on without it when the Hub
is unreachable).

Every download is checked against the Hub's size and, for LFS files, sha256; a bad file is deleted. Archive members
that would land outside DIR (absolute paths, `..`, links pointing out, device files) are refused. Errors print one
message that says what to fix and exit 1; rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import HfApi, hf_hub_download

from embedder.atomic import atomic_open
from embedder.errors import DataError, reported_input_errors
from embedder.progress import Progress, fmt_size, fmt_time

log = logging.getLogger("embedder.data.download")

META_DIR = ".embedder-download"
DEFAULT_TO = "data/llm-embedder"
TASK_DIRS = ("qa", "convsearch", "conversation", "chat", "lrlm", "tool", "icl")
# The BEIR datasets that BeIR/<name> and BeIR/<name>-qrels publish on the Hub (cqadupstack is nested per forum there).
BEIR_NAMES = ("arguana", "climate-fever", "dbpedia-entity", "fever", "fiqa", "hotpotqa", "msmarco", "nfcorpus", "nq",
              "quora", "scidocs", "scifact", "trec-covid", "webis-touche2020")
NETWORK_HINT = ("check your network/proxy, set HF_ENDPOINT for a mirror, or HF_TOKEN for gated repos; "
                "rerun the same command to resume")
RESUME_HINT = "rerun the same command to resume (finished files are kept)"


class DownloadError(DataError):
    """A download that cannot go on; the message says what to fix. `network` marks an unreachable Hub."""

    def __init__(self, message: str, hint: str | None = None, network: bool = False):
        super().__init__(message, hint=hint)
        self.network = network


class UnsafeArchiveError(DownloadError):
    """An archive member that would be written outside the target folder, or is not a plain file/folder/link."""


@dataclass(frozen=True)
class Source:
    """A named dataset: where it lives on the Hub and what it becomes under DIR."""

    name: str
    kind: str  # "tarball" | "parquet" | "beir"
    repo_id: str
    description: str
    files: tuple[str, ...] = ()  # the Hub files to fetch; empty: list the repo
    approx_size: str | None = None  # printed by --dry-run / --list, which make no network call

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")

    def target(self, root: Path) -> Path:
        if self.kind == "parquet":
            return root / "convsearch" / "qrecc" / "corpus"
        if self.kind == "beir":
            return root / "beir" / self.name.split(":", 1)[1]
        return root


SOURCES = {
    "llm-embedder": Source("llm-embedder", "tarball", "namespace-Pt/projects",
                           "LLM-Embedder training and eval data (qa, convsearch, chat, lrlm, tool, icl)",
                           files=("llm-embedder.tar.gz",), approx_size="about 16.9 GB"),
    "qrecc-corpus": Source("qrecc-corpus", "parquet", "namespace-Pt/qrecc-corpus",
                           "QReCC passage corpus (parquet shards, ~54M passages)"),
}


def beir_source(name: str) -> Source:
    return Source(f"beir:{name}", "beir", f"BeIR/{name}", f"BEIR {name} (corpus, queries, qrels)",
                  files=("corpus.jsonl.gz", "queries.jsonl.gz"))


def resolve_sources(names: list[str]) -> list[Source]:
    """The Source of every NAME (repeats dropped); an unknown name raises a DataError with a did-you-mean."""
    out: dict[str, Source] = {}
    for raw in names:
        name = raw.strip()
        if name in SOURCES:
            out[name] = SOURCES[name]
        elif name.startswith("beir:") and name[5:] in BEIR_NAMES:
            out[name] = beir_source(name[5:])
        else:
            raise DataError(_unknown_name_message(name))
    return list(out.values())


def _unknown_name_message(name: str) -> str:
    valid = list(SOURCES) + [f"beir:{n}" for n in BEIR_NAMES]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if not close and name in BEIR_NAMES:
        close = [f"beir:{name}"]
    msg = f"unknown dataset {name!r}"
    if close:
        msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return (msg + f" Valid names: {', '.join(SOURCES)}, beir:<name> with <name> one of {', '.join(BEIR_NAMES)} "
            "(see --list)")


# ---------------------------------------------------------------------------------------------------- Hub access


@dataclass(frozen=True)
class RemoteFile:
    """A file on the Hub as its metadata describes it."""

    repo_id: str
    path: str
    size: int | None
    sha256: str | None  # LFS files only
    oid: str | None  # git blob id

    @property
    def key(self) -> str:
        return f"{self.repo_id}/{self.path}"

    def identity(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "path": self.path, "size": self.size, "sha256": self.sha256, "oid": self.oid}


def _remote_file(repo_id: str, entry: Any) -> RemoteFile | None:
    if not hasattr(entry, "blob_id"):  # a RepoFolder
        return None
    lfs = getattr(entry, "lfs", None)
    sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
    return RemoteFile(repo_id, entry.path, getattr(entry, "size", None), sha256, entry.blob_id)


def _hub_call(what: str, repo_id: str, revision: str | None, call: Callable[[], Any]) -> Any:
    """Run a huggingface_hub call; its errors become a DownloadError that names the fix."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - mapped below; anything unknown is re-raised with its traceback
        error = _explain_hub_error(exc, what, repo_id, revision)
        if error is None:
            raise
        raise error from None


def _explain_hub_error(exc: BaseException, what: str, repo_id: str, revision: str | None) -> DownloadError | None:
    from huggingface_hub import utils as hf_errors

    at = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(exc, hf_errors.GatedRepoError):
        return DownloadError(f"{what}: the dataset repo {at} is gated",
                             hint="accept its terms on huggingface.co, then set HF_TOKEN (or run `hf auth login`)")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return DownloadError(f"{what}: the dataset repo {repo_id} was not found or is private",
                             hint="check the repo name; for a private repo set HF_TOKEN")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return DownloadError(f"{what}: revision {revision!r} not found in {repo_id}",
                             hint="check --revision (a branch, tag or commit of the repo)")
    if isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return DownloadError(f"{what}: the file is not in {at}",
                             hint=f"the repo layout may have changed: see https://huggingface.co/datasets/{repo_id}")
    if _is_network_error(exc):
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        cause = "HF_HUB_OFFLINE is set" if offline else (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        hint = ("unset HF_HUB_OFFLINE; " if offline else "") + NETWORK_HINT
        return DownloadError(f"{what}: could not reach the Hugging Face Hub ({cause})", hint=hint, network=True)
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = (str(exc).splitlines() or [""])[0][:200]
        return DownloadError(f"{what}: the Hub answered HTTP {status or '?'} ({first})",
                             hint="rerun later; set HF_TOKEN if the repo needs a login; " + RESUME_HINT)
    return None


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror, socket.timeout]
    from huggingface_hub import utils as hf_errors

    types += [hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError]
    with contextlib.suppress(ImportError):
        import httpx

        types.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return tuple(types)


def _is_network_error(exc: BaseException) -> bool:
    """An unreachable Hub anywhere in the exception chain (also under huggingface_hub's own wrappers)."""
    types = _network_error_types()
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, types):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@dataclass
class Run:
    """One invocation: the target folder and the options every source shares."""

    root: Path
    revision: str | None = None
    keep_archive: bool = False
    api: Any = None

    def __post_init__(self) -> None:
        if self.api is None:
            self.api = HfApi()

    @property
    def meta(self) -> Path:
        return self.root / META_DIR

    def remote_files(self, repo_id: str, paths: tuple[str, ...] | None = None) -> dict[str, RemoteFile]:
        """Metadata of the given files of a dataset repo (all missing ones: an error), or of every file in it."""
        what = f"listing {repo_id}"
        if paths:
            entries = _hub_call(what, repo_id, self.revision, lambda: self.api.get_paths_info(
                repo_id, list(paths), repo_type="dataset", revision=self.revision))
        else:
            entries = _hub_call(what, repo_id, self.revision, lambda: list(self.api.list_repo_tree(
                repo_id, recursive=True, repo_type="dataset", revision=self.revision)))
        files = {f.path: f for f in (_remote_file(repo_id, e) for e in entries) if f is not None}
        missing = [p for p in paths or () if p not in files]
        if missing:
            raise DownloadError(f"{', '.join(missing)} not found in the dataset repo {repo_id}"
                                + (f"@{self.revision}" if self.revision else ""),
                                hint=f"the repo layout may have changed: see https://huggingface.co/datasets/{repo_id}")
        return files

    def fetch(self, source: Source, remote: RemoteFile) -> Path:
        """Download one file into `hub/<source>/` (resumed by huggingface_hub) and check it against the metadata."""
        staging = self.meta / "hub" / source.slug
        staging.mkdir(parents=True, exist_ok=True)
        local = staging / remote.path
        if remote.size and not local.exists():
            _check_free_space(staging, remote.size, f"{remote.key}")
        log.info("%s: downloading %s (%s)", source.name, remote.key, fmt_size(remote.size))
        start = time.monotonic()
        try:
            path = Path(_hub_call(f"downloading {remote.path} from {remote.repo_id}", remote.repo_id, self.revision,
                                  lambda: hf_hub_download(remote.repo_id, remote.path, repo_type="dataset",
                                                          revision=self.revision, local_dir=str(staging))))
        except OSError as e:  # huggingface_hub's size check after a cut-short transfer
            if "Consistency check failed" not in str(e):
                raise
            raise DownloadError(f"{remote.key}: the download was cut short ({str(e).splitlines()[0]})",
                                hint=f"rerun the same command; if this repeats, delete {staging} to start over"
                                ) from None
        log.info("%s: have %s (%s, %s)", source.name, remote.path, fmt_size(path.stat().st_size),
                 fmt_time(time.monotonic() - start))
        verify_file(path, remote)
        return path


# ------------------------------------------------------------------------------------------ checks and progress


def verify_file(path: Path, remote: RemoteFile) -> None:
    """Check size (and sha256 when the Hub gives one); a mismatch deletes the file and raises a DownloadError."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        _discard(path)
        raise DownloadError(f"{remote.key}: downloaded {size} bytes but the Hub says {remote.size}; deleted {path}",
                            hint="the download was cut short or changed on the Hub: " + RESUME_HINT)
    if not remote.sha256:
        return
    stamp = path.with_name(path.name + ".verified")
    key = {"size": size, "mtime_ns": path.stat().st_mtime_ns, "sha256": remote.sha256}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == key:
            return  # hashed before and not touched since
    digest = sha256_file(path, f"checking {path.name}")
    if digest != remote.sha256:
        _discard(path)
        raise DownloadError(f"{remote.key}: sha256 {digest} does not match the Hub's {remote.sha256}; deleted {path}",
                            hint="the file was corrupted in transfer or on disk: " + RESUME_HINT)
    stamp.write_text(json.dumps(key))


def _discard(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".verified")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sha256_file(path: Path, label: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, Progress(label, path.stat().st_size, quiet_below=0, logger=log) as bar:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _check_free_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(f"not enough disk space for {what}: it needs {fmt_size(need)}, "
                            f"{fmt_size(free)} is free under {folder}",
                            hint="free some space or pass --to a folder on a bigger disk; " + RESUME_HINT)


class _CountingReader:
    """A read-only file wrapper that reports how many bytes were read (the archive's progress)."""

    def __init__(self, f: Any, report: Callable[[int], None]):
        self.f, self.report = f, report

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.report(len(data))
        return data


# --------------------------------------------------------------------------------------------------- manifests


def marker_path(root: Path, source: Source) -> Path:
    return root / META_DIR / f"{source.slug}.json"


def load_marker(root: Path, source: Source) -> dict[str, Any]:
    path = marker_path(root, source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: ignoring unreadable manifest %s (%s)", source.name, path, e)
        return {}
    return data if isinstance(data, dict) and data.get("source") == source.name else {}


def save_marker(root: Path, source: Source, data: dict[str, Any]) -> None:
    data = {"source": source.name, **data, "written": datetime.datetime.now().isoformat(timespec="seconds")}
    with atomic_open(str(marker_path(root, source)), suffix=".json") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")


def _outputs_present(root: Path, files: list[dict[str, Any]]) -> bool:
    for entry in files:
        p = root / entry["path"]
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return False
    return True


def _same_remote(recorded: dict[str, Any] | None, remote: RemoteFile | None) -> bool:
    """The manifest's record of a Hub file matches its current metadata (unknown metadata: assume it does)."""
    if recorded is None:
        return False
    if remote is None:
        return True
    return all(recorded.get(k) == v for k, v in remote.identity().items())


def is_complete(root: Path, source: Source, remotes: dict[str, RemoteFile] | None) -> bool:
    """The manifest says done, its files are all present, and (when known) the Hub files are unchanged."""
    marker = load_marker(root, source)
    if not marker.get("complete") or not _outputs_present(root, marker.get("files", [])):
        return False
    if remotes is None:
        return True
    recorded = marker.get("remote", {})
    return set(recorded) == {r.key for r in remotes.values()} and all(
        _same_remote(recorded.get(r.key), r) for r in remotes.values())


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One download at a time per DIR (fcntl; a no-op where it is missing)."""
    (root / META_DIR).mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(root / META_DIR / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(f"another download is writing into {root}",
                                hint="wait for it to finish, or pass another --to") from None
        yield


# ---------------------------------------------------------------------------------------------- safe extraction


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
            with tarfile.open(fileobj=_CountingReader(raw, bar.update), mode="r|*") as tar:
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


def link_qrecc(root: Path, files: list[dict[str, Any]]) -> dict[str, Any]:
    """Make `convsearch/qrecc` available when the archive has only `conversation/qrecc`; says what was found."""
    has = {layout: any(f["path"].startswith(f"{layout}/qrecc/") for f in files)
           for layout in ("convsearch", "conversation")}
    if has["convsearch"]:
        log.info("QReCC: found convsearch/qrecc")
        return {"qrecc_layout": "convsearch/qrecc"}
    if not has["conversation"]:
        log.warning("QReCC: the archive has neither convsearch/qrecc nor conversation/qrecc")
        return {"qrecc_layout": None}
    log.info("QReCC: found conversation/qrecc (the single-task doc's name); making convsearch/qrecc point to it")
    return {"qrecc_layout": "conversation/qrecc", "qrecc_link": ensure_qrecc_link(root)}


def ensure_qrecc_link(root: Path) -> str:
    """`convsearch/qrecc` -> `../conversation/qrecc` (relative symlink; per entry when the folder already exists,
    e.g. holding `corpus/` from qrecc-corpus; a copy where symlinks are not allowed)."""
    legacy, conv = root / "conversation" / "qrecc", root / "convsearch" / "qrecc"
    if conv.is_symlink():
        return "symlink"
    conv.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not conv.exists():
            os.symlink(os.path.join("..", "conversation", "qrecc"), conv, target_is_directory=True)
            return "symlink"
        for entry in sorted(legacy.iterdir()):
            if not (conv / entry.name).exists() and not (conv / entry.name).is_symlink():
                os.symlink(os.path.join("..", "..", "conversation", "qrecc", entry.name), conv / entry.name)
        return "symlink per entry"
    except OSError as e:
        log.warning("QReCC: could not symlink (%s); copying conversation/qrecc to convsearch/qrecc", e)
        shutil.copytree(legacy, conv, dirs_exist_ok=True)
        return "copy"


# ------------------------------------------------------------------------------------------------------ sources


def get_tarball(run: Run, source: Source) -> None:
    """`llm-embedder`: download the archive, unpack it into a temp folder inside DIR, move its files in place."""
    remotes = _metadata_or_none(run, source, lambda: run.remote_files(source.repo_id, source.files))
    if is_complete(run.root, source, remotes):
        marker = load_marker(run.root, source)
        if marker.get("qrecc_layout") == "conversation/qrecc":
            ensure_qrecc_link(run.root)
        log.info("%s: already complete in %s; nothing to do", source.name, run.root)
        return
    if remotes is None:
        raise DownloadError(f"{source.name}: could not reach the Hugging Face Hub and {run.root} has no complete "
                            "download", hint=NETWORK_HINT, network=True)
    remote = remotes[source.files[0]]
    archive = run.fetch(source, remote)
    old = load_marker(run.root, source)
    if old:  # files are about to change: a crash midway must not look complete
        save_marker(run.root, source, {**{k: v for k, v in old.items() if k not in ("source", "written")},
                                       "complete": False})
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=run.meta))
    try:
        extract_archive(archive, tmp, archive.name)
        top = content_root(tmp)
        if not any((top / t).is_dir() for t in TASK_DIRS):
            log.warning("%s: the archive has none of the task folders %s", source.name, ", ".join(TASK_DIRS))
        link = run.root / "convsearch" / "qrecc"
        if link.is_symlink() and (top / "convsearch" / "qrecc").is_dir():
            link.unlink()  # an earlier archive had only conversation/qrecc; this one has the folder itself
        files = move_tree(top, run.root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_stale_outputs(run.root, source, {f["path"] for f in files})
    qrecc = link_qrecc(run.root, files)
    save_marker(run.root, source, {"complete": True, "revision": run.revision,
                                   "remote": {remote.key: remote.identity()}, **qrecc,
                                   "total_size": sum(f["size"] for f in files), "files": files})
    log.info("%s: %d files (%s) in %s", source.name, len(files), fmt_size(sum(f["size"] for f in files)), run.root)
    if not run.keep_archive:
        shutil.rmtree(run.meta / "hub" / source.slug, ignore_errors=True)
        log.info("%s: deleted the archive (pass --keep-archive to keep it)", source.name)


def get_parquet_shards(run: Run, source: Source) -> None:
    """`qrecc-corpus`: every `*.parquet` of the repo into `convsearch/qrecc/corpus/`, names relative to their common
    folder (row order = shards sorted by path)."""
    listed = _metadata_or_none(run, source, lambda: run.remote_files(source.repo_id))
    remotes = None if listed is None else {p: r for p, r in sorted(listed.items()) if p.endswith(".parquet")}
    if is_complete(run.root, source, remotes):
        log.info("%s: already complete in %s; nothing to do", source.name, source.target(run.root))
        return
    if remotes is None:
        raise DownloadError(f"{source.name}: could not reach the Hugging Face Hub and {run.root} has no complete "
                            "download", hint=NETWORK_HINT, network=True)
    if not remotes:
        raise DownloadError(f"the dataset repo {source.repo_id} has no *.parquet files",
                            hint=f"see https://huggingface.co/datasets/{source.repo_id}")
    strip = len(_common_folder(list(remotes)))
    target = source.target(run.root).relative_to(run.root)
    outputs = {p: target.joinpath(*PurePosixPath(p).parts[strip:]) for p in remotes}
    _drop_stale_outputs(run.root, source, {o.as_posix() for o in outputs.values()})
    files = _fetch_each(run, source, remotes, lambda r, staged: _move_file(staged, run.root / outputs[r.path]),
                        {p: o.as_posix() for p, o in outputs.items()})
    extra = {"shards": len(files)}
    extra.update(_parquet_summary([run.root / f["path"] for f in files]))
    _finish(run, source, remotes, files, extra)


def get_beir(run: Run, source: Source) -> None:
    """`beir:<name>`: corpus/queries from BeIR/<name> (gunzipped), `<split>.tsv` from BeIR/<name>-qrels."""
    qrels_repo = f"{source.repo_id}-qrels"

    def metadata() -> dict[str, RemoteFile]:
        main = run.remote_files(source.repo_id, source.files)
        qrels = {p: r for p, r in run.remote_files(qrels_repo).items() if p.endswith(".tsv") and "/" not in p}
        if not qrels:
            raise DownloadError(f"the dataset repo {qrels_repo} has no <split>.tsv qrels files",
                                hint=f"see https://huggingface.co/datasets/{qrels_repo}")
        return {r.key: r for r in [*main.values(), *sorted(qrels.values(), key=lambda r: r.path)]}

    remotes = _metadata_or_none(run, source, metadata)
    target = source.target(run.root).relative_to(run.root)
    if is_complete(run.root, source, remotes):
        log.info("%s: already complete in %s; nothing to do", source.name, run.root / target)
        return
    if remotes is None:
        raise DownloadError(f"{source.name}: could not reach the Hugging Face Hub and {run.root} has no complete "
                            "download", hint=NETWORK_HINT, network=True)
    outputs = {k: (target / "qrels" / r.path if r.path.endswith(".tsv") else target / r.path.removesuffix(".gz"))
               for k, r in remotes.items()}

    def place(remote: RemoteFile, staged: Path) -> None:
        dest = run.root / outputs[remote.key]
        if staged.suffix == ".gz":
            gunzip_atomic(staged, dest)
            if not run.keep_archive:
                _discard(staged)
        else:
            _move_file(staged, dest)

    _drop_stale_outputs(run.root, source, {o.as_posix() for o in outputs.values()})
    files = _fetch_each(run, source, remotes, place, {k: o.as_posix() for k, o in outputs.items()})
    from embedder.paths import is_beir_folder

    if not is_beir_folder(str(run.root / target)):
        raise DownloadError(f"{run.root / target} is not a complete BEIR folder after the download",
                            hint="delete it and rerun the same command")
    splits = sorted(PurePosixPath(r.path).stem for r in remotes.values() if r.path.endswith(".tsv"))
    _finish(run, source, remotes, files, {"splits": splits})


GETTERS: dict[str, Callable[[Run, Source], None]] = {"tarball": get_tarball, "parquet": get_parquet_shards,
                                                     "beir": get_beir}


def _metadata_or_none(run: Run, source: Source, fetch: Callable[[], dict[str, RemoteFile]]
                      ) -> dict[str, RemoteFile] | None:
    """The Hub metadata, or None when the Hub is unreachable but a complete download is here (checked by the caller)."""
    try:
        return fetch()
    except DownloadError as e:
        if e.network and load_marker(run.root, source).get("complete"):
            log.warning("%s: %s; using what is already in %s without checking for updates", source.name,
                        str(e).splitlines()[0], run.root)
            return None
        raise


def _fetch_each(run: Run, source: Source, remotes: dict[str, RemoteFile],
                place: Callable[[RemoteFile, Path], None], outputs: dict[str, str]) -> list[dict[str, Any]]:
    """Download and place each Hub file (keys of `remotes`, outputs relative to DIR) that is not already in place
    unchanged; the manifest is updated after each file, so a rerun resumes at the first missing one."""
    marker = load_marker(run.root, source)
    recorded = marker.get("remote", {})
    have = {f["path"]: f for f in marker.get("files", [])}
    # what is still valid from an earlier run stays recorded until its file is checked (a crash keeps it)
    done = {r.key: recorded[r.key] for r in remotes.values() if r.key in recorded}
    files = {out: have[out] for out in outputs.values() if out in have}
    for n, (key, remote) in enumerate(remotes.items(), start=1):
        out = outputs[key]
        if _same_remote(recorded.get(remote.key), remote) and out in have and _outputs_present(run.root, [have[out]]):
            log.info("%s: [%d/%d] %s already in place", source.name, n, len(remotes), out)
        else:
            log.info("%s: [%d/%d] %s", source.name, n, len(remotes), remote.key)
            place(remote, run.fetch(source, remote))
        done[remote.key] = remote.identity()
        files[out] = {"path": out, "size": (run.root / out).stat().st_size}
        save_marker(run.root, source, {"complete": False, "revision": run.revision, "remote": done,
                                       "files": sorted(files.values(), key=lambda f: f["path"])})
    return sorted(files.values(), key=lambda f: f["path"])


def _finish(run: Run, source: Source, remotes: dict[str, RemoteFile], files: list[dict[str, Any]],
            extra: dict[str, Any]) -> None:
    total = sum(f["size"] for f in files)
    save_marker(run.root, source, {"complete": True, "revision": run.revision,
                                   "remote": {r.key: r.identity() for r in remotes.values()}, **extra,
                                   "total_size": total, "files": files})
    if source.kind == "parquet" or not run.keep_archive:  # shards were moved out; only huggingface_hub's notes remain
        shutil.rmtree(run.meta / "hub" / source.slug, ignore_errors=True)
    log.info("%s: %d files (%s) in %s", source.name, len(files), fmt_size(total), source.target(run.root))


def _drop_stale_outputs(root: Path, source: Source, expected: set[str]) -> None:
    """Delete files an earlier download of this source wrote that the Hub no longer has (a stale shard would
    shift the corpus rows)."""
    for entry in load_marker(root, source).get("files", []):
        if entry["path"] not in expected:
            log.warning("%s: removing %s (no longer on the Hub)", source.name, entry["path"])
            with contextlib.suppress(FileNotFoundError):
                (root / entry["path"]).unlink()


def _common_folder(paths: list[str]) -> tuple[str, ...]:
    """The folder parts all the Hub paths share (`("data",)` for `data/train-0000*.parquet`)."""
    common: list[str] = []
    for parts in zip(*(PurePosixPath(p).parent.parts for p in paths)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return tuple(common)


def _move_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    with contextlib.suppress(FileNotFoundError):
        src.with_name(src.name + ".verified").unlink()


def gunzip_atomic(src: Path, dest: Path) -> None:
    """Decompress `src` to a temp file beside `dest`, then rename it into place (never a half-written `dest`)."""
    try:
        with open(src, "rb") as raw, \
                Progress(f"decompressing {src.name}", src.stat().st_size, quiet_below=0, logger=log) as bar, \
                gzip.open(_CountingReader(raw, bar.update)) as zin, \
                atomic_open(str(dest), suffix=dest.suffix, binary=True) as out:
            shutil.copyfileobj(zin, out, 1 << 22)
    except (OSError, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a disk error: reported by main
        _discard(src)
        raise DownloadError(f"{src} is not a valid gzip file ({e}); deleted it", hint=RESUME_HINT) from None


def _parquet_summary(paths: list[Path]) -> dict[str, Any]:
    """Rows per shard and the columns, for the manifest (pyarrow is optional here)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return {}
    rows, columns = [], None
    for p in paths:
        meta = pq.ParquetFile(p).metadata
        rows.append(meta.num_rows)
        columns = columns or list(meta.schema.names)
    return {"rows": sum(rows), "rows_per_shard": rows, "columns": columns}


# ---------------------------------------------------------------------------------------------------------- CLI


def describe(source: Source, root: Path) -> list[str]:
    """What --dry-run prints for a source: repo, files, size when known without the network, target."""
    unknown = "size unknown (dry run, no network)"
    done = " [already complete]" if load_marker(root, source).get("complete") else ""
    if source.kind == "tarball":
        return [f"{source.name}{done}: dataset repo {source.repo_id} (repo_type=dataset), file {source.files[0]} "
                f"({source.approx_size or unknown}) -> unpacked into {root}/ "
                f"({', '.join(t + '/' for t in TASK_DIRS if t != 'conversation')})"]
    if source.kind == "parquet":
        return [f"{source.name}{done}: dataset repo {source.repo_id} (repo_type=dataset), files *.parquet "
                f"({unknown}) -> {source.target(root)}/"]
    target = source.target(root)
    return [f"{source.name}{done}: dataset repo {source.repo_id} (repo_type=dataset), files "
            f"{', '.join(source.files)} ({unknown}) -> {target}/corpus.jsonl, {target}/queries.jsonl",
            f"{' ' * len(source.name)}  dataset repo {source.repo_id}-qrels (repo_type=dataset), files "
            f"<split>.tsv (train/dev/test, whichever exist; {unknown}) -> {target}/qrels/"]


def list_text() -> str:
    rows = [(s.name, f"{s.description}; {s.repo_id}" + (f", {s.approx_size}" if s.approx_size else ""))
            for s in SOURCES.values()]
    rows.append(("beir:<name>", "a BEIR dataset from BeIR/<name> and BeIR/<name>-qrels into DIR/beir/<name>/; "
                                f"<name>: {', '.join(BEIR_NAMES)}"))
    return "\n".join(f"{name:<14} {text}" for name, text in rows)


def download(sources: list[Source], run: Run) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    with _lock(run.root):
        for source in sources:
            GETTERS[source.kind](run, source)


def _disk_error(exc: OSError, root: Path) -> DownloadError | None:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DownloadError(f"no space left on the device while writing under {root} ({exc.filename or exc})",
                             hint="free some space or pass --to a folder on a bigger disk; " + RESUME_HINT)
    if isinstance(exc, PermissionError):
        return DownloadError(f"permission denied: {exc.filename or exc}",
                             hint="pass --to a folder you can write to")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedder.data.download",
        description="Download the LLM-Embedder data, the QReCC corpus or BEIR datasets from the Hugging Face Hub.",
        epilog="Rerunning the same command resumes; a complete download is skipped.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="llm-embedder, qrecc-corpus, beir:<name> (--list)")
    parser.add_argument("--to", default=os.environ.get("EMBEDDER_DATA") or DEFAULT_TO, metavar="DIR",
                        help="data root (default: $EMBEDDER_DATA, else ./data/llm-embedder); pass it as data_root=DIR")
    parser.add_argument("--list", action="store_true", help="list the dataset names and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded and where; no network")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repos (default: main)")
    parser.add_argument("--keep-archive", action=argparse.BooleanOptionalAction, default=False,
                        help="keep llm-embedder.tar.gz and the BEIR .gz files after unpacking (default: delete them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)  # quiet httpx's request lines
    log.setLevel(logging.INFO)
    if args.list:
        print(list_text())
        return 0
    if not args.names:
        parser.error("give at least one NAME (see --list)")
    root = Path(args.to).expanduser().absolute()
    with reported_input_errors():
        sources = resolve_sources(args.names)
        if args.dry_run:
            for source in sources:
                print("\n".join(describe(source, root)))
            print(f"dry run: nothing downloaded; then use data_root={root}")
            return 0
        try:
            download(sources, Run(root=root, revision=args.revision, keep_archive=args.keep_archive))
        except OSError as e:
            error = _disk_error(e, root)
            if error is None:
                raise
            raise error from None
        except KeyboardInterrupt:
            print(f"interrupted: {RESUME_HINT}", file=sys.stderr)
            raise SystemExit(130) from None
    print(f"done: {', '.join(s.name for s in sources)} in {root}; use data_root={root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
