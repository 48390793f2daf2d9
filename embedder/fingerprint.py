"""`fingerprint(*parts)`: the one short, stable hash of JSON-serialisable parts that every cache key uses (search
results, corpus indexes, mined negatives, prepared BEIR splits). Imports nothing from the package, so every layer
may use it."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(*parts: Any) -> str:
    """16 hex digits of blake2b over `parts` as sorted-key JSON (non-JSON values by their `str`)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()
