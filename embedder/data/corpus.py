"""Corpora in bounded memory: JSON lines or parquet, read on access, never loaded into a Python list.

`open_corpus(path, key_template)` accepts

- a JSON-lines file (`corpus.json`, `corpus.jsonl`): one object per line, row i = line i (blank lines skipped);
- a parquet file, or a folder of parquet shards (how the QReCC corpus ships): row i = the i-th row across the
  shards taken in sorted path order.

Either way the result is a `Corpus`: a read-only sequence of formatted texts (`key_template.format(**record)`,
the data contract's `format_key`), so `corpus[i]`, `corpus[a:b]`, `len(corpus)` and `corpus.take(rows)` work the
same for both, and every consumer (encoding, BM25, mining, answer recall) takes it as its texts.

What is held in memory: for JSON lines, one int64 byte offset per document (memory-mapped from the index cache,
so the ranks of a node share it); for parquet, a few numbers per row group and the last row group read. An `id`,
`_id` or `docid` field, when present, must be unique; duplicates are found with a sorted array of 8-byte hashes
(transient, 8 bytes per document), not a set of strings.

Every record is checked once (JSON lines: each line is parsed and formatted; parquet: the schema has the fields
the template reads) and the result is cached by `index_cache`, keyed by the files' identity and the template.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from embedder.data.index_cache import cached_index, file_identity
from embedder.data.jsonl import JsonlRecords, LazyView, iter_jsonl_offsets
from embedder.data.records import ID_FIELDS, format_key, key_fields
from embedder.errors import DataError
from embedder.fingerprint import fingerprint
from embedder.progress import Progress

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a sequence of texts (order and boundaries included), to key caches on their content.

    A `Corpus` (or a `PrefixedTexts` view of one) answers from its cached fingerprint without reading every text.
    """
    fp = getattr(texts, "fingerprint", None)
    if callable(fp):
        return fp()
    h = hashlib.blake2b(digest_size=8)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class Corpus(Sequence):
    """Formatted corpus texts, row i = document i, read on access. See the module docstring."""

    path: str
    key_template: str
    id_field: str | None = None
    strip: bool = False  # strip the formatted text (BEIR: "{title} {text}" with an empty title)
    defaults: dict[str, str] | None = None  # fields a record may leave out (BEIR: title)

    def _text(self, record: dict[str, Any]) -> str:
        text = format_key(record, self.key_template, self.path, defaults=self.defaults)
        return text.strip() if self.strip else text

    def _fingerprint(self, digest: str) -> str:
        parts = [digest, self.key_template] + (["strip"] if self.strip else [])
        return fingerprint(*parts)

    @property
    def texts(self) -> Corpus:
        """The corpus itself: it is the sequence of texts."""
        return self

    @property
    def ids(self) -> Sequence[str] | None:
        """The documents' own ids (`id`, `_id` or `docid`), read on access; None when the corpus has none."""
        if self.id_field is None:
            return None
        return LazyView(len(self), lambda i: str(self.records([i])[int(i)][self.id_field]))

    def fingerprint(self) -> str:
        raise NotImplementedError

    def take(self, rows: Iterable[int]) -> dict[int, str]:
        """`{row: text}` for many rows at once (parquet reads each row group once)."""
        return {int(r): self[int(r)] for r in rows}

    def records(self, rows: Iterable[int]) -> dict[int, dict[str, Any]]:
        raise NotImplementedError

    def __getitem__(self, i):
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class PrefixedTexts(Sequence):
    """`prefix + text` for every text of `texts`, computed on access (an instruction before every corpus row)."""

    def __init__(self, texts: Sequence[str], prefix: str):
        self.base, self.prefix = texts, prefix or ""

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.prefix + t for t in self.base[i]]
        return self.prefix + self.base[i]

    def fingerprint(self) -> str:
        return fingerprint(self.prefix, texts_fingerprint(self.base))


def prefixed(texts: Sequence[str], prefix: str) -> Sequence[str]:
    return PrefixedTexts(texts, prefix) if prefix else texts


# ---------------------------------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------------------------------

def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _check_unique(hashes: np.ndarray, find_lines, path: str, id_field: str) -> None:
    """Duplicate ids by a sort of their 8-byte hashes; on a hit, `find_lines(hash)` names the two lines."""
    if len(hashes) < 2:
        return
    s = np.sort(hashes)
    dup = np.nonzero(s[1:] == s[:-1])[0]
    if len(dup):
        first, second, doc_id = find_lines(int(s[dup[0]]))
        raise DataError(f"duplicate document id {doc_id!r} (first on line {first})", path=path, line=second,
                        field=id_field, hint="document ids must be unique; remove or rename the repeated document")


class JsonlCorpus(Corpus):
    """A JSON-lines corpus: its records read by byte offset (`JsonlRecords`), formatted on access."""

    def __init__(self, path: str, key_template: str, offsets: np.ndarray, id_field: str | None, digest: str):
        self.path, self.key_template, self.rows = path, key_template, JsonlRecords(path, offsets)
        self.id_field, self._digest = id_field, digest

    def __len__(self) -> int:
        return len(self.rows)

    def records(self, rows: Iterable[int]) -> dict[int, dict[str, Any]]:
        return {int(r): self.rows[int(r)] for r in rows}

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._text(r) for r in self.rows[i]]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"corpus row {i} out of range ({len(self)} documents)")
        return self._text(self.rows[i])

    def fingerprint(self) -> str:
        return self._fingerprint(self._digest)


def _scan_jsonl(path: str, key_template: str,
                defaults: dict[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    offsets, hashes = array("q"), array("Q")
    digest = hashlib.blake2b(digest_size=16)  # of the bytes: the corpus's fingerprint, whatever the file is called
    id_field: str | None = None
    for line, offset, record in iter_jsonl_offsets(path, progress=f"indexing corpus {os.path.basename(path)}",
                                                   digest=digest):
        format_key(record, key_template, path, line, defaults)
        if not offsets:
            id_field = next((f for f in ID_FIELDS if f in record), None)
        if id_field is not None:
            if id_field not in record:
                raise DataError(f"corpus record has no '{id_field}' although earlier records do", path=path,
                                line=line, field=id_field, hint="give every document an id, or none")
            hashes.append(_id_hash(str(record[id_field])))
        offsets.append(offset)
    if not offsets:
        raise DataError("the corpus is empty", path=path,
                        hint="one JSON object per line, e.g. {\"title\": .., \"text\": ..}")

    def find_lines(h: int):
        first = None
        for line, _, record in iter_jsonl_offsets(path):
            if _id_hash(str(record[id_field])) == h:
                if first is not None:
                    return first, line, str(record[id_field])
                first = line
        return first, None, "?"

    if id_field is not None:
        _check_unique(np.frombuffer(hashes, dtype=np.uint64), find_lines, path, id_field)
    return ({"offsets": np.frombuffer(offsets, dtype=np.int64)},
            {"id_field": id_field, "digest": digest.hexdigest(), "rows": len(offsets)})


# ---------------------------------------------------------------------------------------------------------------------
# parquet
# ---------------------------------------------------------------------------------------------------------------------

def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets/transformers installs
        raise ImportError("reading a parquet corpus needs pyarrow: pip install pyarrow") from None
    return pq


def parquet_files(path: str) -> list[str]:
    """A parquet file, or every parquet file under a folder (recursively), in sorted path order."""
    if os.path.isfile(path):
        return [path]
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.endswith(PARQUET_SUFFIXES) and os.path.isfile(f))
    if not files:
        raise DataError("no parquet files in this folder", path=path,
                        hint="point corpus= at a JSON-lines file, a .parquet file, or a folder of .parquet shards")
    return files


class ParquetCorpus(Corpus):
    """Rows of parquet shards; `group_starts[g]` is the first global row of row group g (over all files)."""

    def __init__(self, path: str, key_template: str, files: list[str], group_file: np.ndarray,
                 group_index: np.ndarray, group_starts: np.ndarray, id_field: str | None, digest: str):
        self.path, self.key_template, self.files = path, key_template, files
        # (G,), (G,), (G+1,)
        self.group_file, self.group_index, self.group_starts = group_file, group_index, group_starts
        self.id_field, self._digest = id_field, digest
        self.columns = key_fields(key_template) + ([id_field] if id_field and id_field not in key_fields(key_template)
                                                   else [])
        self._cached: tuple[int, list[dict[str, Any]]] | None = None  # the last row group read
        self._handles: dict[int, Any] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def _handle(self, f: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if f not in self._handles:
            self._handles[f] = _pq().ParquetFile(self.files[f])
        return self._handles[f]

    def _group(self, g: int) -> list[dict[str, Any]]:
        if self._cached is None or self._cached[0] != g:
            table = self._handle(int(self.group_file[g])).read_row_group(int(self.group_index[g]),
                                                                         columns=self.columns)
            cols = {name: table.column(name).to_pylist() for name in self.columns}
            self._cached = (g, [dict(zip(cols, vals)) for vals in zip(*cols.values())])
        return self._cached[1]

    def records(self, rows: Iterable[int]) -> dict[int, dict[str, Any]]:
        rows = np.asarray(sorted({int(r) for r in rows}), dtype=np.int64)
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        out = {}
        for r, g in zip(rows.tolist(), groups.tolist()):  # rows sorted: each row group is read once
            out[r] = self._group(g)[r - int(self.group_starts[g])]
        return out

    def take(self, rows: Iterable[int]) -> dict[int, str]:
        recs = self.records(rows)
        return {r: self._text(rec) for r, rec in recs.items()}

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            rows = range(start, stop, step)
            texts = self.take(rows)
            return [texts[r] for r in rows]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"corpus row {i} out of range ({len(self)} documents)")
        i %= len(self)
        return self.take([i])[i]

    def fingerprint(self) -> str:
        return self._fingerprint(self._digest)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_cached", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles, self._cached, self._pid = {}, None, None


def _scan_parquet(path: str, files: list[str], key_template: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    pq = _pq()
    group_file, group_index, starts = [], [], [0]
    digest = hashlib.blake2b(digest_size=16)
    need = key_fields(key_template)
    id_field: str | None = None
    for f, name in enumerate(files):
        try:
            meta = pq.ParquetFile(name).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a damaged or non-parquet file
            raise DataError(f"cannot read this parquet file ({e})", path=name,
                            hint="re-download the shard (the download command resumes and checks sizes)") from None
        schema = meta.schema.to_arrow_schema().names
        missing = [c for c in need if c not in schema]
        if missing:
            raise DataError(f"the parquet schema has no column '{missing[0]}', which key_template {key_template!r} "
                            f"needs (columns: {schema})", path=name, field=missing[0],
                            hint="set key_template to the corpus's columns, e.g. key_template='{text}'")
        fid = next((c for c in ID_FIELDS if c in schema), None)
        if f == 0:
            id_field = fid
        elif fid != id_field:
            raise DataError(f"shard has id column {fid!r} but the first shard has {id_field!r}", path=name,
                            field=fid or id_field, hint="every shard of a corpus needs the same columns")
        for g in range(meta.num_row_groups):
            group_file.append(f)
            group_index.append(g)
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        # content fingerprint without reading the data: name, size and the footer (row-group sizes, statistics)
        size = os.path.getsize(name)
        with open(name, "rb") as fh:
            fh.seek(max(0, size - 65536))
            digest.update(json.dumps([os.path.relpath(name, path) if name != path else os.path.basename(name),
                                      size]).encode())
            digest.update(fh.read())
    if starts[-1] == 0:
        raise DataError("the corpus is empty", path=path, hint="the parquet shards hold no rows")
    arrays = {"group_file": np.asarray(group_file, np.int64), "group_index": np.asarray(group_index, np.int64),
              "group_starts": np.asarray(starts, np.int64)}
    if id_field is not None:
        # one column at a time, one row group at a time: 8 bytes per document, transient
        hashes = np.empty(starts[-1], dtype=np.uint64)
        bar = Progress(f"checking corpus ids of {os.path.basename(path)}", starts[-1], unit="rows", logger=log)
        for g, (f, gi) in enumerate(zip(group_file, group_index)):
            col = pq.ParquetFile(files[f]).read_row_group(gi, columns=[id_field]).column(id_field).to_pylist()
            hashes[starts[g]:starts[g + 1]] = [_id_hash(str(x)) for x in col]
            bar.update(len(col))
        bar.finish()

        def find_lines(h: int):
            rows = np.nonzero(hashes == np.uint64(h))[0][:2]
            corpus = ParquetCorpus(path, "{" + id_field + "}", files, *arrays.values(), id_field, "")
            return int(rows[0]) + 1, int(rows[1]) + 1, corpus[int(rows[0])]

        _check_unique(hashes, find_lines, path, id_field)
    return arrays, {"id_field": id_field, "digest": digest.hexdigest(), "rows": int(starts[-1]), "files": files}


# ---------------------------------------------------------------------------------------------------------------------

def is_parquet(path: str) -> bool:
    return path.endswith(PARQUET_SUFFIXES) or os.path.isdir(path)


def open_corpus(path: str, key_template: str = "{title} {text}", use_cache: bool = True, strip: bool = False,
                defaults: dict[str, str] | None = None) -> Corpus:
    """Open a corpus (JSON lines, parquet file or folder of parquet shards), checked and indexed once, cached.

    `strip=True` strips every formatted text (`"{title} {text}"` with an empty title); `defaults` fills fields
    a record may leave out (`{"title": ""}` for BEIR).

    Errors (a malformed line, a missing template field, a duplicate id) name the file, the line (the row, for
    parquet) and the field.
    """
    key_fields(key_template)  # a bad template fails here, before any file is read
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus {path!r}: file not found")
    if is_parquet(path):
        files = parquet_files(path)
        key = {"files": [file_identity(f) for f in files], "key_template": key_template}
        arrays, meta = cached_index("corpus-parquet", key, lambda: _scan_parquet(path, files, key_template),
                                    use_cache=use_cache)
        corpus: Corpus = ParquetCorpus(path, key_template, files, arrays["group_file"], arrays["group_index"],
                                       arrays["group_starts"], meta["id_field"], meta["digest"])
    else:
        key = {"file": file_identity(path), "key_template": key_template, "defaults": defaults}
        arrays, meta = cached_index("corpus-jsonl", key, lambda: _scan_jsonl(path, key_template, defaults),
                                    use_cache=use_cache)
        corpus = JsonlCorpus(path, key_template, arrays["offsets"], meta["id_field"], meta["digest"])
    corpus.strip, corpus.defaults = strip, defaults
    log.info("corpus %s: %d documents (%s)", path, len(corpus), type(corpus).__name__)
    return corpus
