"""Talking to the Hugging Face Hub: listing and fetching files (huggingface_hub resumes cut downloads), checking
them against the Hub's size and sha256, and turning Hub/network errors into one message."""


from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download

from embedder.data.download.sources import META_DIR, NETWORK_HINT, RESUME_HINT, DownloadError, Source
from embedder.progress import Progress, fmt_size, fmt_time

log = logging.getLogger(__name__)


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
        discard(path)
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
        discard(path)
        raise DownloadError(f"{remote.key}: sha256 {digest} does not match the Hub's {remote.sha256}; deleted {path}",
                            hint="the file was corrupted in transfer or on disk: " + RESUME_HINT)
    stamp.write_text(json.dumps(key))


def discard(path: Path) -> None:
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


class CountingReader:
    """A read-only file wrapper that reports how many bytes were read (the archive's progress)."""

    def __init__(self, f: Any, report: Callable[[int], None]):
        self.f, self.report = f, report

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.report(len(data))
        return data


# --------------------------------------------------------------------------------------------------- manifests
