"""How many DataLoader workers tokenise while the model runs: `auto` picks from the device and the CPUs."""

from __future__ import annotations

import os

import torch

TRAIN_MAX_WORKERS = 4  # training batches (B x G texts a step): 4 workers held an H200's bert-base step at 395 q/s
ENCODE_MAX_WORKERS = 8  # corpus encoding: one tokenising process does ~3k passages/s, an H200's forward ~18k/s


def resolve_num_workers(num_workers: int | str | None, on_gpu: bool, ranks_per_node: int | None = None,
                        cap: int = TRAIN_MAX_WORKERS, cpus: int | None = None) -> int:
    """DataLoader workers for one rank. A number is taken as it is. `auto` (or None): on a GPU, up to `cap`, within
    the CPUs this process may use shared by the node's ranks (`ranks_per_node`; default: the visible GPUs), one
    CPU left to each rank's own loop; on a CPU, 0, since its cores run the model. Measured on an H200: one process
    tokenising B=100 x G=8 texts a step held bert-base training at 110 queries/s, 4 workers gave 395; corpus
    encoding went from 2.3k to 7.6k passages/s with 8 workers (docs/benchmarks.md)."""
    if num_workers is not None and str(num_workers).lower() != "auto":
        value = int(num_workers)
        if value < 0:
            raise ValueError(f"num_workers={num_workers!r}; valid: auto or an integer >= 0")
        return value
    if not on_gpu:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if ranks_per_node is None:
        ranks_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(0, min(cap, cpus // max(1, ranks_per_node) - 1))


def trainer_num_workers(num_workers: int | str | None, trainer, cap: int = TRAIN_MAX_WORKERS) -> int:
    """`resolve_num_workers` for a loader a Lightning trainer drives: the device is the strategy's root device (what
    the model runs on) and the node's ranks are the trainer's devices. Without a trainer: one rank on the CPU. The
    one place training and encoding loaders ask where they run."""
    if trainer is None:
        return resolve_num_workers(num_workers, False, 1, cap)
    return resolve_num_workers(num_workers, trainer.strategy.root_device.type == "cuda", trainer.num_devices, cap)
