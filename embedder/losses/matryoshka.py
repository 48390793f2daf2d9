"""Matryoshka representation learning (Kusupati et al., 2022; sentence-transformers' `MatryoshkaLoss`): the same
losses on every leading prefix of the embeddings, so one model serves at several sizes (`truncate_dim`).

`loss.matryoshka_dims: [768, 512, 256, 128, 64]` makes the training loss `sum_d w_d * L(q[:, :d], k[:, :d])`, where
`L` is the record kind's usual (combined) loss and each prefix is L2-normalised again when the encoder normalises
(cosine similarity of the truncated vectors, what `SentenceTransformer(..., truncate_dim=d)` computes).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def truncate(x: Tensor, dim: int, normalize: bool) -> Tensor:
    """(N, D) -> (N, dim): the leading `dim` dimensions, L2-normalised again when `normalize`."""
    x = x[:, :dim]
    return F.normalize(x, p=2, dim=-1) if normalize else x


def check_dims(dims: list[int] | None, weights: list[float] | None, embedding_dim: int) -> tuple[list[int], list[float]]:
    """`(dims, weights)` checked: distinct positive dims no larger than the embeddings, one weight >= 0 each (None:
    1 each, as sentence-transformers does)."""
    if not dims:
        return [], []
    dims = [int(d) for d in dims]
    if len(set(dims)) != len(dims) or any(d < 1 or d > embedding_dim for d in dims):
        raise ValueError(f"loss.matryoshka_dims={dims}: distinct sizes between 1 and the embedding size "
                         f"{embedding_dim}, e.g. [{embedding_dim}, {embedding_dim // 2}, {embedding_dim // 4}]")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims) or any(w < 0 for w in weights):
        raise ValueError(f"loss.matryoshka_weights={weights}: one number >= 0 per dimension of {dims} (or null)")
    return dims, weights
