"""The few collectives the losses need, each a no-op outside a process group (style convention 12).

Cross-device negatives follow one rule everywhere: every rank keeps its LOCAL queries and scores them against the
keys of ALL ranks, concatenated in rank order, so rank r's query b owns the key group that starts at row
``(rank_offset(B) + b) * G`` of the gathered keys. The gather is autograd-aware
(``torch.distributed.nn.functional.all_gather``): in backward each rank receives the sum over ranks of the gradients
that flowed into its shard. DDP then averages the parameter gradients over ranks, which gives exactly the gradient
of the mean loss over all ``B * world_size`` queries. So the loss is never multiplied by ``world_size``.

Every rank must pass a tensor of the same shape (same local batch and group size), as with any all_gather; the
data module guarantees this (equal per-rank batches, padded or dropped last batch).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group, 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group, 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, keeping the autograd graph (identity when not distributed).

    Input ``(N, ...)`` on every rank, output ``(world_size * N, ...)`` with rank r's rows at ``r*N .. r*N+N-1``.
    Gradients reaching the output rows of other ranks are sent back to those ranks in backward.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather  # imported lazily: absent in CPU-only minimal builds

    with warnings.catch_warnings():
        # Recent torch (2.13 here) flags it deprecated in favour of the private `_functional_collectives`, whose names still
        # change between releases; the public function keeps working, so silence the once-per-step warning.
        warnings.filterwarnings("ignore", message=r".*nn\.functional\.all_gather is deprecated", category=FutureWarning)
        gathered = all_gather(t.contiguous())  # W tensors of shape (N, ...)
    return torch.cat(gathered, dim=0)  # (W*N, ...)


@torch.no_grad()
def gather_no_grad(t: Tensor) -> Tensor:
    """Like :func:`gather_with_grad` but detached (plain ``all_gather``); for teacher scores and metrics."""
    if not is_distributed() or dist.get_world_size() == 1:
        return t.detach()
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out, dim=0)  # (W*N, ...)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first query in the gathered batch: ``rank * local_batch`` (0 when not distributed)."""
    return rank() * local_batch
