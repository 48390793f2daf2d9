"""`python -m embedder.data.download` against a fake Hugging Face Hub (a local folder; no network).

The fake replaces the two things the module calls: `hf_hub_download` (copies a file from the fake hub into
`local_dir`, like huggingface_hub does, and records the call) and `HfApi` (`get_paths_info` / `list_repo_tree`
answer with real `RepoFile` objects whose size, git oid and LFS sha256 describe the fake files).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from huggingface_hub.hf_api import RepoFile, RepoFolder

import embedder.data.download.archive as dl_archive
import embedder.data.download.cli as dl_cli
import embedder.data.download.fetch as dl_fetch
import embedder.data.download.hub as dl_hub

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ("namespace-Pt/projects", "llm-embedder.tar.gz")


class FakeHub:
    """A folder `<hub>/<repo_id>/<path>` served as Hub dataset repos. `metadata_override[(repo, path)]` changes what
    the metadata says (to fake a corrupted download); `unreachable` makes every call fail like a dead network."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.downloads: list[tuple[str, str]] = []  # files actually copied
        self.calls: list[tuple[str, str]] = []  # every call: (kind, repo_id)
        self.metadata_override: dict[tuple[str, str], dict] = {}
        self.unreachable = False

    def put(self, repo_id: str, path: str, data: bytes) -> None:
        p = self.folder / repo_id / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def _entry(self, repo_id: str, path: str) -> RepoFile:
        data = (self.folder / repo_id / path).read_bytes()
        meta = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                **self.metadata_override.get((repo_id, path), {})}
        return RepoFile(path=path, size=meta["size"], oid=hashlib.sha1(data).hexdigest(),
                        lfs={"size": meta["size"], "oid": meta["sha256"], "pointerSize": 134})

    def _check(self, kind: str, repo_id: str) -> None:
        self.calls.append((kind, repo_id))
        if self.unreachable:
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")
        assert (self.folder / repo_id).is_dir(), f"fake hub has no repo {repo_id}"

    # --- what embedder.data.download calls
    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str | None = None,
                        revision: str | None = None, local_dir: str | None = None, **kwargs) -> str:
        assert repo_type == "dataset" and local_dir is not None
        self._check("download", repo_id)
        src, dest = self.folder / repo_id / filename, Path(local_dir) / filename
        if dest.exists() and dest.read_bytes() == src.read_bytes():
            return str(dest)  # huggingface_hub: already downloaded, nothing fetched
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        self.downloads.append((repo_id, filename))
        return str(dest)

    def api(self) -> FakeApi:
        return FakeApi(self)


class FakeApi:
    def __init__(self, hub: FakeHub):
        self.hub = hub

    def get_paths_info(self, repo_id: str, paths: list[str], *, repo_type: str | None = None,
                       revision: str | None = None, **kwargs) -> list[RepoFile]:
        assert repo_type == "dataset"
        self.hub._check("paths_info", repo_id)
        return [self.hub._entry(repo_id, p) for p in paths if (self.hub.folder / repo_id / p).is_file()]

    def list_repo_tree(self, repo_id: str, path_in_repo: str | None = None, *, recursive: bool = False,
                       repo_type: str | None = None, revision: str | None = None, **kwargs):
        assert repo_type == "dataset" and recursive
        self.hub._check("tree", repo_id)
        base = self.hub.folder / repo_id
        for p in sorted(base.rglob("*"), reverse=True):  # the Hub's order is not sorted; the module must sort
            rel = p.relative_to(base).as_posix()
            yield RepoFolder(path=rel, oid="tree") if p.is_dir() else self.hub._entry(repo_id, rel)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(dl_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(dl_hub, "HfApi", fake.api)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # the log-line progress, as in SLURM
    return fake


def make_tar(members: dict[str, bytes | str | tuple[bytes, str]], top: str | None = "llm-embedder") -> bytes:
    """A .tar.gz with regular files (bytes), symlinks (str: the link target) and other members
    (`(tar type, link target)`, e.g. `(tarfile.LNKTYPE, "../x")` for a hard link)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            if isinstance(content, (str, tuple)):
                info.type, info.linkname = (tarfile.SYMTYPE, content) if isinstance(content, str) else content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


LLM_FILES = {"qa/msmarco/train.json": b'{"query": "q", "pos": ["p"]}\n',
             "tool/toolbench/corpus.json": b'{"content": "a tool"}\n',
             "conversation/qrecc/test.concat.json": b'{"query": "hi", "answers": ["x"]}\n'}


def run_cli(*args: str) -> int:
    try:
        return dl_cli.main(list(args))
    except SystemExit as e:
        return int(e.code)


def count_extractions(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = dl_archive.extract_archive

    def spy(archive, dest, label):
        calls.append(archive)
        return real(archive, dest, label)

    monkeypatch.setattr(dl_fetch, "extract_archive", spy)  # where fetch looks it up
    return calls


def test_llm_embedder_layout_manifest_and_idempotent_rerun(hub, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level("INFO", logger="embedder.data.download")
    hub.put(*TARBALL, make_tar(LLM_FILES))
    hub.put("namespace-Pt/projects", "other-project.tar.gz", b"not ours")
    extractions = count_extractions(monkeypatch)
    root = tmp_path / "data"

    assert run_cli("llm-embedder", "--to", str(root)) == 0
    assert hub.downloads == [TARBALL] and len(extractions) == 1
    for name, content in LLM_FILES.items():  # the top folder `llm-embedder/` is stripped
        assert (root / name).read_bytes() == content
    qrecc = root / "convsearch" / "qrecc"
    assert qrecc.is_symlink() and not os.path.isabs(os.readlink(qrecc))
    assert (qrecc / "test.concat.json").read_bytes() == LLM_FILES["conversation/qrecc/test.concat.json"]
    manifest = json.loads((root / ".embedder-download" / "llm-embedder.json").read_text())
    assert manifest["complete"] and manifest["qrecc_layout"] == "conversation/qrecc"
    assert manifest["files"] == [{"path": n, "size": len(c)} for n, c in sorted(LLM_FILES.items())]
    assert list(manifest["remote"]) == ["namespace-Pt/projects/llm-embedder.tar.gz"]
    meta = root / ".embedder-download"
    assert not list(meta.glob("extract-*")) and not (meta / "hub" / "llm-embedder").exists()  # archive deleted
    assert "found conversation/qrecc" in caplog.text
    assert "extracting llm-embedder.tar.gz: 100%" in caplog.text and "ETA" in caplog.text  # non-terminal progress
    assert f"data_root={root}" in capsys.readouterr().out

    # a second run: metadata is checked, nothing is downloaded or extracted
    mtime = (root / "qa/msmarco/train.json").stat().st_mtime_ns
    hub.calls.clear()
    assert run_cli("llm-embedder", "--to", str(root)) == 0
    assert hub.calls == [("paths_info", "namespace-Pt/projects")]
    assert hub.downloads == [TARBALL] and len(extractions) == 1
    assert (root / "qa/msmarco/train.json").stat().st_mtime_ns == mtime
    assert "already complete" in caplog.text

    # the Hub unreachable: the complete download is used as it is
    hub.unreachable = True
    assert run_cli("llm-embedder", "--to", str(root)) == 0
    assert len(extractions) == 1 and "without checking for updates" in caplog.text


def test_changed_archive_or_missing_files_re_extract(hub, tmp_path, monkeypatch):
    hub.put(*TARBALL, make_tar(LLM_FILES, top=None))  # no top folder: used as it is
    extractions = count_extractions(monkeypatch)
    root = tmp_path / "data"
    assert run_cli("llm-embedder", "--to", str(root), "--keep-archive") == 0
    assert (root / "qa/msmarco/train.json").is_file()
    assert (root / ".embedder-download/hub/llm-embedder/llm-embedder.tar.gz").is_file()  # kept

    (root / "qa/msmarco/train.json").unlink()  # a deleted file: extracted again from the kept archive
    assert run_cli("llm-embedder", "--to", str(root)) == 0
    assert len(hub.downloads) == 1 and len(extractions) == 2 and (root / "qa/msmarco/train.json").is_file()

    changed = {**LLM_FILES, "convsearch/qrecc/train.concat.json": b"{}\n"}  # a new archive on the Hub
    hub.put(*TARBALL, make_tar(changed, top=None))
    assert run_cli("llm-embedder", "--to", str(root)) == 0
    assert len(hub.downloads) == 2 and len(extractions) == 3
    manifest = json.loads((root / ".embedder-download/llm-embedder.json").read_text())
    assert manifest["qrecc_layout"] == "convsearch/qrecc" and not (root / "convsearch/qrecc").is_symlink()


@pytest.mark.parametrize("members, bad", [
    ({"../evil.txt": b"x"}, "../evil.txt"),
    ({"qa/ok.json": b"{}", "../../../../evil.txt": b"x"}, "../../../../evil.txt"),
    ({"<tmp>/evil-abs.txt": b"x"}, "<tmp>/evil-abs.txt"),  # an absolute path
    ({"qa/passwd": "/etc/passwd"}, "qa/passwd"),
    ({"qa/up": "../../../../../etc/passwd"}, "qa/up"),
    ({"qa/hard": (tarfile.LNKTYPE, "../../../../etc/passwd")}, "qa/hard"),
    ({"qa/tty": (tarfile.CHRTYPE, "")}, "qa/tty"),
])
def test_malicious_archive_is_refused(hub, tmp_path, members, bad, capsys):
    members = {k.replace("<tmp>", str(tmp_path)): v for k, v in members.items()}
    bad = bad.replace("<tmp>", str(tmp_path))
    hub.put(*TARBALL, make_tar(members, top=None))
    root = tmp_path / "area" / "data"
    assert run_cli("llm-embedder", "--to", str(root)) == 1
    err = capsys.readouterr().err
    assert f"refusing to extract member {bad!r}" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("evil*") if "hub" not in p.parts]
    assert not (root / "qa").exists() and not list((root / ".embedder-download").glob("extract-*"))
    assert not (root / ".embedder-download" / "llm-embedder.json").exists()


@pytest.mark.parametrize("override, message", [({"size": 999}, "but the Hub says 999"),
                                               ({"sha256": "0" * 64}, "does not match the Hub's")])
def test_size_or_checksum_mismatch_deletes_the_file(hub, tmp_path, override, message, capsys):
    hub.put(*TARBALL, make_tar(LLM_FILES))
    hub.metadata_override[TARBALL] = override
    root = tmp_path / "data"
    assert run_cli("llm-embedder", "--to", str(root)) == 1
    err = capsys.readouterr().err
    assert message in err and "deleted" in err and "Traceback" not in err
    assert not (root / ".embedder-download/hub/llm-embedder/llm-embedder.tar.gz").exists()
    assert not (root / "qa").exists()

    del hub.metadata_override[TARBALL]  # the next try downloads again and succeeds
    assert run_cli("llm-embedder", "--to", str(root)) == 0 and len(hub.downloads) == 2


def write_parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_qrecc_corpus_shards_in_sorted_order(hub, tmp_path):
    import pyarrow.parquet as pq

    repo = "namespace-Pt/qrecc-corpus"
    hub.put(repo, "data/train-00001-of-00002.parquet", write_parquet([{"id": "c", "text": "third"}]))
    hub.put(repo, "data/train-00000-of-00002.parquet",
            write_parquet([{"id": "a", "text": "first"}, {"id": "b", "text": "second"}]))
    hub.put(repo, "README.md", b"# qrecc corpus\n")
    root = tmp_path / "data"
    assert run_cli("qrecc-corpus", "--to", str(root)) == 0

    corpus = root / "convsearch" / "qrecc" / "corpus"
    shards = sorted(p.name for p in corpus.iterdir())
    assert shards == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]  # `data/` stripped
    ids = [i for s in shards for i in pq.read_table(corpus / s).column("id").to_pylist()]
    assert ids == ["a", "b", "c"]
    manifest = json.loads((root / ".embedder-download/qrecc-corpus.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 3 and manifest["rows_per_shard"] == [2, 1]
    assert manifest["columns"] == ["id", "text"]
    assert [f["path"] for f in manifest["files"]] == [f"convsearch/qrecc/corpus/{s}" for s in shards]
    assert not (root / ".embedder-download/hub/qrecc-corpus").exists()

    assert run_cli("qrecc-corpus", "--to", str(root)) == 0  # rerun: nothing downloaded
    assert len(hub.downloads) == 2


def test_qrecc_corpus_resumes_after_a_partial_run(hub, tmp_path):
    repo = "namespace-Pt/qrecc-corpus"
    for i in range(3):
        hub.put(repo, f"part-{i}.parquet", write_parquet([{"id": str(i), "text": "t"}]))
    hub.metadata_override[(repo, "part-2.parquet")] = {"size": 1}  # the third download "fails"
    root = tmp_path / "data"
    assert run_cli("qrecc-corpus", "--to", str(root)) == 1
    del hub.metadata_override[(repo, "part-2.parquet")]
    assert run_cli("qrecc-corpus", "--to", str(root)) == 0
    assert [f for _, f in hub.downloads] == ["part-0.parquet", "part-1.parquet", "part-2.parquet", "part-2.parquet"]
    shards = sorted(p.name for p in (root / "convsearch/qrecc/corpus").iterdir())
    assert shards == [f"part-{i}.parquet" for i in range(3)]


def test_qrecc_corpus_next_to_a_conversation_layout(hub, tmp_path):
    """qrecc-corpus first, then an archive with `conversation/qrecc`: both end up under `convsearch/qrecc`."""
    hub.put("namespace-Pt/qrecc-corpus", "c.parquet", write_parquet([{"id": "0", "text": "t"}]))
    hub.put(*TARBALL, make_tar(LLM_FILES))
    root = tmp_path / "data"
    assert run_cli("qrecc-corpus", "llm-embedder", "--to", str(root)) == 0
    qrecc = root / "convsearch" / "qrecc"
    assert (qrecc / "corpus" / "c.parquet").is_file() and (qrecc / "test.concat.json").is_file()
    assert (qrecc / "test.concat.json").is_symlink()


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


def test_beir_folder(hub, tmp_path):
    from embedder.data.beir import load_beir
    from embedder.paths import is_beir_folder

    corpus = "".join(json.dumps({"_id": f"d{i}", "title": f"t{i}", "text": f"doc {i}"}) + "\n" for i in range(4))
    queries = "".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(3))
    hub.put("BeIR/scifact", "corpus.jsonl.gz", gz(corpus))
    hub.put("BeIR/scifact", "queries.jsonl.gz", gz(queries))
    hub.put("BeIR/scifact", "scifact.py", b"# loading script\n")
    hub.put("BeIR/scifact-qrels", "test.tsv", b"query-id\tcorpus-id\tscore\nq0\td1\t1\nq2\td3\t2\n")
    hub.put("BeIR/scifact-qrels", "train.tsv", b"query-id\tcorpus-id\tscore\nq1\td0\t1\n")
    hub.put("BeIR/scifact-qrels", "README.md", b"# qrels\n")
    root = tmp_path / "data"
    assert run_cli("beir:scifact", "--to", str(root)) == 0

    folder = root / "beir" / "scifact"
    assert is_beir_folder(str(folder))
    assert sorted(p.name for p in (folder / "qrels").iterdir()) == ["test.tsv", "train.tsv"]
    assert (folder / "corpus.jsonl").read_text() == corpus and (folder / "queries.jsonl").read_text() == queries
    data = load_beir(str(folder), "test")
    assert [(q["query_id"], q["pos_index"], q["pos_relevance"]) for q in data.queries] == [
        ("q0", [1], [1]), ("q2", [3], [2])]
    assert len(data.corpus) == 4
    assert not list(folder.rglob(".tmp-*")) and not (root / ".embedder-download/hub/beir-scifact").exists()
    manifest = json.loads((root / ".embedder-download/beir-scifact.json").read_text())
    assert manifest["complete"] and manifest["splits"] == ["test", "train"]

    assert run_cli("beir:scifact", "--to", str(root)) == 0
    assert len(hub.downloads) == 4  # nothing new


def test_dry_run_makes_no_hub_call(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run called the Hub")

    monkeypatch.setattr(dl_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(dl_hub, "HfApi", no_network)
    root = tmp_path / "data"
    assert run_cli("llm-embedder", "qrecc-corpus", "beir:scifact", "--to", str(root), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "namespace-Pt/projects" in out and "llm-embedder.tar.gz" in out and "about 16.9 GB" in out
    assert "namespace-Pt/qrecc-corpus" in out and f"{root}/convsearch/qrecc/corpus/" in out
    assert "BeIR/scifact-qrels" in out and f"{root}/beir/scifact/qrels/" in out
    assert "size unknown (dry run, no network)" in out
    assert not root.exists()


def test_list(capsys):
    assert run_cli("--list") == 0
    out = capsys.readouterr().out
    assert "llm-embedder" in out and "qrecc-corpus" in out and "beir:<name>" in out and "scifact" in out


@pytest.mark.parametrize("name, suggestion", [("llm-embeder", "'llm-embedder'"), ("beir:scifct", "'beir:scifact'"),
                                              ("scifact", "'beir:scifact'")])
def test_unknown_name_suggests(name, suggestion, tmp_path, capsys):
    assert run_cli(name, "--to", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"did you mean {suggestion}" in err and "Traceback" not in err and "--list" in err


def test_unknown_name_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "embedder.data.download", "llm-embeder", "--to", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "did you mean 'llm-embedder'" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_hub_is_one_clear_message(hub, tmp_path, capsys):
    hub.put(*TARBALL, make_tar(LLM_FILES))
    hub.unreachable = True
    assert run_cli("llm-embedder", "--to", str(tmp_path / "data")) == 1
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face Hub" in err and "HF_ENDPOINT" in err and "rerun" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the message and its hint


def test_missing_repo_file_names_the_repo(hub, tmp_path, capsys):
    hub.put("namespace-Pt/projects", "something-else.tar.gz", b"x")
    assert run_cli("llm-embedder", "--to", str(tmp_path / "data")) == 1
    err = capsys.readouterr().err
    assert "llm-embedder.tar.gz not found in the dataset repo namespace-Pt/projects" in err


def test_disk_full_is_reported(hub, tmp_path, monkeypatch, capsys):
    import errno

    hub.put(*TARBALL, make_tar(LLM_FILES))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere")

    monkeypatch.setattr(dl_hub, "hf_hub_download", full)
    assert run_cli("llm-embedder", "--to", str(tmp_path / "data")) == 1
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "--to" in err and "Traceback" not in err


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_data_target():
    out = subprocess.run(["make", "-n", "data", "NAME=beir:scifact", "TO=/tmp/some-dir", "ARGS=--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "-m embedder.data.download beir:scifact --to /tmp/some-dir --dry-run" in out


def test_links_inside_the_archive_are_kept(hub, tmp_path):
    hub.put(*TARBALL, make_tar({"icl/icl/corpus.json": b"{}\n", "icl/icl/alias.json": "corpus.json",
                                "chat/msc/train.json": b"{}\n", "chat/msc/copy.json": (tarfile.LNKTYPE,
                                                                                       "chat/msc/train.json")},
                               top=None))
    root = tmp_path / "data"
    assert run_cli("llm-embedder", "--to", str(root)) == 0
    assert (root / "icl/icl/alias.json").is_symlink() and (root / "icl/icl/alias.json").read_bytes() == b"{}\n"
    assert (root / "chat/msc/copy.json").read_bytes() == b"{}\n"
