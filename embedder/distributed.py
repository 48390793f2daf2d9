"""Ranks and the few collectives the losses need, each a no-op outside a process group (style convention 12).

`launched_rank` / `launched_world_size` / `local_rank` read the launcher's environment (before a process group
exists); `rank` / `world_size` ask the process group. Nothing else reads RANK, WORLD_SIZE or LOCAL_RANK.

Cross-device negatives follow one rule everywhere: every rank keeps its LOCAL queries and scores them against the
keys of ALL ranks, concatenated in rank order, so rank r's query b owns the key group that starts at row
``(rank_offset(B) + b) * G`` of the gathered keys. The gather is autograd-aware (the semantics of
``torch.distributed.nn.functional.all_gather``): in backward each rank receives the sum over ranks of the gradients
that flowed into its shard. DDP then averages the parameter gradients over ranks, which gives exactly the gradient
of the mean loss over all ``B * world_size`` queries. So the loss is never multiplied by ``world_size``.

Every rank must pass a tensor of the same shape (same local batch and group size), as with any all_gather; the
data module guarantees this (equal per-rank batches, padded or dropped last batch).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _env_int(names: tuple[str, ...], default: int) -> int:
    for var in names:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return default


def launched_rank() -> int:
    """This process's global rank as the launcher (torchrun, SLURM) set it, before any process group exists; 0 for a
    single process. The one place the rank environment variables are read."""
    return _env_int(("RANK", "SLURM_PROCID", "LOCAL_RANK"), 0)


def launched_world_size() -> int:
    """How many processes torchrun started (WORLD_SIZE); 1 otherwise. SLURM_NTASKS is not read: a batch script with
    several tasks that runs one process would otherwise wait for ranks that never start."""
    return _env_int(("WORLD_SIZE",), 1)


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID")


@contextlib.contextmanager
def as_single_process() -> Iterator[None]:
    """Inside the block the launcher's rank variables are hidden, so a step that one rank runs alone (task=beir's
    preparation on rank 0, while the other ranks wait for it) does not split its work across ranks that are not
    there. Restored afterwards."""
    saved = {var: os.environ.pop(var) for var in LAUNCH_VARS if var in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def local_rank() -> int:
    """This process's index on its machine (its GPU), as the launcher set it; 0 for a single process."""
    return _env_int(("LOCAL_RANK", "SLURM_LOCALID"), 0)


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group, 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group, 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather + cat in forward; in backward each rank gets the sum over ranks of the gradient of its own rows.

    Equivalent to ``torch.distributed.nn.functional.all_gather`` (whose backward is a reduce-scatter), written with
    public collectives only because (a) torch 2.13 deprecates that function in favour of the private
    ``_functional_collectives`` module, and (b) merely importing ``torch.distributed.nn`` (it pulls in the RPC
    package) made gloo processes abort at interpreter exit ("terminate called without an active exception") in
    about 1 run in 10 on torch 2.13 CPU (Lightning imports it anyway, so this only keeps the loss code and its
    spawn tests free of it). The backward all-reduces the whole ``(W*N, ...)`` gradient instead of
    reduce-scattering it: W times the bytes of one shard, negligible for a batch of key embeddings, and it works
    on every backend (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), t.size(0)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)  # (W*N, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # (W*N, ...); cloned: never modify autograd's buffer in place
        dist.all_reduce(grad)  # sum over ranks of d(loss_r)/d(gathered)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]  # (N, ...) this rank's shard


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, keeping the autograd graph (identity when not distributed).

    Input ``(N, ...)`` on every rank, output ``(world_size * N, ...)`` with rank r's rows at ``r*N .. r*N+N-1``.
    Gradients reaching the output rows of other ranks are sent back to those ranks in backward, so every rank
    must run backward through it (as under DDP).
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)  # (W*N, ...)


def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` (e.g. integer ids) from all ranks along dim 0, no autograd: ``(N, ...) -> (W*N, ...)``,
    rank r's rows at ``r*N``; identity when not distributed."""
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def average_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = 25 * 2 ** 20) -> None:
    """All-reduce the gradients of `params` to their mean over the ranks, in flat buckets of about `bucket_bytes`
    (DDP's default bucket size): what DDP's reducer does, by hand, for steps the reducer cannot follow (GradCache
    backpropagates once per mini-batch, and the reducer expects each gradient once per step). Every rank passes the
    same parameters in the same order; a parameter without a gradient takes part as zeros. No-op outside a process
    group."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    def reduce(bucket: list[torch.nn.Parameter]) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # (sum of numels,)
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if bucket and (size + nbytes > bucket_bytes or p.grad.dtype != bucket[0].grad.dtype
                       or p.grad.device != bucket[0].grad.device):
            reduce(bucket)
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        reduce(bucket)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first query in the gathered batch: ``rank * local_batch`` (0 when not distributed)."""
    return rank() * local_batch


def prepare_once(marker: str, key: str, build: Callable[[], dict[str, Any]], what: str,
                 poll_s: float = 5.0) -> dict[str, Any]:
    """Run `build()` in one process of the job and hand its result (a JSON-able dict) to every rank: the shared
    shape of every rank-0-only preparation step (a recipe's `prepare` stage; anything that mines or scores inside a
    training job).

    - A single process, or rank 0 of a torchrun/SLURM launch, runs `build` with the launcher's rank variables hidden
      (`as_single_process`: mining and scoring inside it must not split their work across ranks that are waiting
      for it), then writes `{"key": key, **result}` to `marker` atomically. With Lightning's own DDP launcher the
      other ranks do not exist yet: they start after this returns.
    - Other ranks of a torchrun/SLURM launch wait for a `marker` that records this `key` (a stale one, from other
      settings, is ignored), with a log line every minute.
    - Two separate jobs on one folder take turns (a file lock beside the marker); `build` is expected to reuse the
      first job's cached steps.
    """
    import logging
    import time

    from filelock import FileLock

    from embedder.atomic import read_json, write_json

    log = logging.getLogger(__name__)
    if launched_world_size() > 1 and launched_rank() > 0:
        start = last = time.monotonic()
        while True:
            if os.path.isfile(marker):
                done = read_json(marker)
                if done.get("key") == key:
                    return done
            if time.monotonic() - last >= 60:
                log.info("rank %d: waiting for rank 0's %s (%s; %.0f min so far)", launched_rank(), what, marker,
                         (time.monotonic() - start) / 60)
                last = time.monotonic()
            time.sleep(poll_s)
    os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
    lock = FileLock(os.path.abspath(marker) + ".lock")
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("another process is running the %s (%s); waiting for it, then reusing its files", what, marker)
        lock.acquire()
    try:
        with as_single_process():
            result = {"key": key, **build()}
        write_json(marker, result)
    finally:
        lock.release()
    return result
