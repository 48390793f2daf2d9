"""Batch samplers: every global batch from one dataset (the reference's `inbatch_same_dataset`), DDP-aware.

Hand-written because no library sampler does per-dataset global batches sliced per rank; Lightning's
DistributedSampler would mix datasets inside a batch. Each rank reads global batch t and takes its slice
`[rank*bs:(rank+1)*bs]`, so all ranks see the same dataset at the same step (reference §2.3).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

MODES = ("epoch", "epoch-static", "random", "epoch-random", "shuffle")


class SameDatasetBatchSampler(Sampler[list[int]]):
    """Yield this rank's slice of global batches drawn from one dataset at a time.

    Modes (reference §2.3): `epoch` shuffles each dataset, cuts global batches of bs*world (dropping the
    remainder) and shuffles the batch order; `epoch-static` cuts batches once and only reshuffles their order;
    `random` picks a dataset with p proportional to size, then draws bs indices per rank; `epoch-random` picks
    a dataset with p proportional to what is left of it. `shuffle` ignores datasets (single-task runs).
    The number of batches per epoch is the same for every mode: the sum over datasets of size // (bs*world).
    """

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int, mode: str = "epoch", seed: int = 42,
                 rank: int = 0, world_size: int = 1):
        if mode not in MODES:
            raise ValueError(f"inbatch_same_dataset={mode!r}; valid: {', '.join(MODES)}")
        self.ranges, self.bs, self.mode, self.seed = list(ranges), int(batch_size), mode, int(seed)
        self.rank, self.world = int(rank), int(world_size)
        self.epoch = 0
        self.skip = 0  # batches to skip at the start of the next iteration (resume mid-epoch)
        gb = self.bs * self.world
        self._len = sum((b - a) // gb for a, b in self.ranges)
        if mode == "shuffle":
            self._len = sum(b - a for a, b in self.ranges) // gb
        if self._len == 0:
            sizes = [b - a for a, b in self.ranges]
            raise ValueError(f"no full global batch: dataset sizes {sizes} but batch_size*world_size = {gb}; "
                             f"lower data.batch_size")
        self._static = None

    @property
    def batch_size(self) -> int:
        """Per-rank batch size (Lightning and DeepSpeed read `batch_sampler.batch_size`)."""
        return self.bs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def _global_batches(self) -> list[np.ndarray]:
        gb = self.bs * self.world
        rng = np.random.default_rng([self.seed, self.epoch])  # same on every rank
        if self.mode == "shuffle":
            idx = rng.permutation(np.concatenate([np.arange(a, b) for a, b in self.ranges]))
            return [idx[i * gb:(i + 1) * gb] for i in range(self._len)]
        if self.mode in ("epoch", "epoch-static"):
            if self.mode == "epoch-static" and self._static is not None:
                batches = list(self._static)
            else:
                brng = rng if self.mode == "epoch" else np.random.default_rng([self.seed])
                batches = []
                for a, b in self.ranges:
                    idx = a + brng.permutation(b - a)
                    batches += [idx[i * gb:(i + 1) * gb] for i in range((b - a) // gb)]
                if self.mode == "epoch-static":
                    self._static = list(batches)
            order = rng.permutation(len(batches))
            return [batches[i] for i in order]
        sizes = np.array([b - a for a, b in self.ranges], dtype=float)
        if self.mode == "random":
            out = []
            for _ in range(self._len):
                d = rng.choice(len(self.ranges), p=sizes / sizes.sum())
                a, b = self.ranges[d]
                out.append(a + rng.choice(b - a, size=min(gb, b - a), replace=False))
            return out
        # epoch-random: p proportional to the remaining size; a dataset with < gb left is emptied
        pools = [list(a + rng.permutation(b - a)) for a, b in self.ranges]
        out = []
        while len(out) < self._len:
            left = np.array([len(p) if len(p) >= gb else 0 for p in pools], dtype=float)
            if left.sum() == 0:
                pools = [list(a + rng.permutation(b - a)) for a, b in self.ranges]
                continue
            d = rng.choice(len(pools), p=left / left.sum())
            out.append(np.array(pools[d][:gb]))
            pools[d] = pools[d][gb:]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        start, self.skip = self.skip, 0
        for g in batches[start:]:
            yield [int(i) for i in g[self.rank * self.bs:(self.rank + 1) * self.bs]]
