"""Tokenise a batch of groups: B queries and B*G keys, query b's keys contiguous with the positive first."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def text_ids(texts: list[str]) -> torch.Tensor:
    """(N,) int64 ids equal exactly for equal texts (8 bytes of blake2b: the same on every rank and run), so the
    loss can tell a key that repeats another query's positive (`loss.mask_duplicate_keys`)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True)
                         for t in texts], dtype=torch.int64)


def positive_ids(items: list[dict[str, Any]]) -> torch.Tensor:
    """(B, P) the text ids of each item's labelled positives (`positives`; its group's positive when it has none),
    a row shorter than the longest padded with its group's positive (already the query's target): what
    `loss.mask_known_positives` leaves out of a query's negatives."""
    rows = [list(it.get("positives") or []) or [it["keys"][0]] for it in items]
    width = max(len(r) for r in rows)
    return torch.stack([text_ids(r + [it["keys"][0]] * (width - len(r))) for r, it in zip(rows, items)])


class RetrievalCollator:
    """Pads to the longest sequence in the batch (not to max_length), so no compute goes to padding."""

    def __init__(self, tokenizer, query_max_length: int = 256, key_max_length: int = 256, pad_to_multiple_of: int | None = 8,
                 positive_ids: bool = False):
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.key_max_length = key_max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.positive_ids = bool(positive_ids)  # only `loss.mask_known_positives` reads them: hashed only then

    def _tok(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                   pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"))

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        kinds = {it["record_kind"] for it in items}
        if len(kinds) != 1:
            raise ValueError(f"a batch mixes record kinds {sorted(kinds)}; use data.inbatch_same_dataset=epoch "
                             f"so every batch comes from one dataset")
        sizes = {len(it["keys"]) for it in items}
        if len(sizes) != 1:
            raise ValueError(f"groups of different sizes {sorted(sizes)} in one batch")
        keys = [k for it in items for k in it["keys"]]  # (B*G,) row-major: query b owns rows b*G..b*G+G-1
        has = [it["teacher_scores"] is not None for it in items]
        if any(has) and not all(has):
            raise ValueError("some records of the batch have teacher_scores and some do not")
        scores = torch.tensor([it["teacher_scores"] for it in items], dtype=torch.float32) if all(has) else None
        batch = {
            "query": self._tok([it["query"] for it in items], self.query_max_length),
            "key": self._tok(keys, self.key_max_length),
            "key_ids": text_ids(keys),  # (B*G,) equal for equal key texts
            "teacher_scores": scores,  # (B, G) or None
            "record_kind": items[0]["record_kind"],
            "dataset": items[0]["dataset"],
            "path": items[0].get("path"),  # the batch's training file, named when its loss is not finite
        }
        if self.positive_ids:
            batch["positive_ids"] = positive_ids(items)  # (B, P) ids of each query's labelled positives
        return batch
