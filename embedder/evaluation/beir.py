"""Moved to `embedder.data.beir` (the BEIR readers belong with the other data readers). This name keeps working
for one release: `python -m embedder.evaluation.beir ...` and its imports, with a warning."""

from __future__ import annotations

import warnings

from embedder.data.beir import BeirData, convert_beir, load_beir, main, read_qrels  # noqa: F401

warnings.warn("embedder.evaluation.beir moved to embedder.data.beir; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main()
