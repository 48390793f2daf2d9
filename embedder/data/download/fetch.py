"""Fetching each kind of source, with a manifest per source that makes a rerun skip what is done."""


from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from embedder.atomic import atomic_open
from embedder.data.download.archive import (
    common_folder,
    content_root,
    extract_archive,
    gunzip_atomic,
    move_file,
    move_tree,
)
from embedder.data.download.hub import RemoteFile, Run, discard
from embedder.data.download.sources import BEIR_NAMES, META_DIR, NETWORK_HINT, SOURCES, TASK_DIRS, DownloadError, Source
from embedder.progress import fmt_size

log = logging.getLogger(__name__)


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
    strip = len(common_folder(list(remotes)))
    target = source.target(run.root).relative_to(run.root)
    outputs = {p: target.joinpath(*PurePosixPath(p).parts[strip:]) for p in remotes}
    _drop_stale_outputs(run.root, source, {o.as_posix() for o in outputs.values()})
    files = _fetch_each(run, source, remotes, lambda r, staged: move_file(staged, run.root / outputs[r.path]),
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
                discard(staged)
        else:
            move_file(staged, dest)

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
