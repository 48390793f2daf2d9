"""What can be downloaded: the named sources (llm-embedder, qrecc-corpus, beir:<name>) and the download errors."""


from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from embedder.errors import DataError

log = logging.getLogger(__name__)


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
