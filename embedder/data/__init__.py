"""Data: the record contract (`records`), lazy readers of training files, queries and corpora (offsets only in
memory), the download of the real data, per-task sampling, batching, collation and the DataModule.

Owns reading and checking input files. Must not import modeling, retrieval, evaluation, mining or scoring: every
other package reads data through here."""
