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
  `BeIR/<name>` and the `<split>.tsv` files of `BeIR/<name>-qrels`, as the BEIR folder `embedder.data.beir`
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
