"""Same-dataset batching: every global batch from one file, ranks take disjoint slices, epochs reshuffle."""

from __future__ import annotations

import pytest

from embedder.data.batching import MODES, SameDatasetBatchSampler

RANGES = [(0, 40), (40, 64), (64, 100)]


def dataset_of(i):
    return next(d for d, (a, b) in enumerate(RANGES) if a <= i < b)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "shuffle"])
def test_every_global_batch_is_one_dataset_and_ranks_are_disjoint(mode):
    bs, world = 4, 2
    ranks = [SameDatasetBatchSampler(RANGES, bs, mode, seed=3, rank=r, world_size=world) for r in range(world)]
    batches = [list(s) for s in ranks]
    assert all(len(b) == len(ranks[0]) == 40 // 8 + 24 // 8 + 36 // 8 for b in batches)
    for step in zip(*batches):
        flat = [i for b in step for i in b]
        assert len({dataset_of(i) for i in flat}) == 1
        assert len(flat) == bs * world
        if mode != "random":
            assert len(set(flat)) == len(flat)


def test_epoch_mode_covers_each_dataset_once_and_reshuffles():
    s = SameDatasetBatchSampler(RANGES, 4, "epoch", seed=1)
    e0 = list(s)
    seen = sorted(i for b in e0 for i in b)
    assert len(seen) == len(set(seen)) == 40 + 24 + 36
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    assert list(s) == e0  # deterministic given (seed, epoch)


def test_epoch_static_keeps_batches_changes_order():
    s = SameDatasetBatchSampler(RANGES, 4, "epoch-static", seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(map(tuple, e0)) == sorted(map(tuple, e1)) and e0 != e1


def test_skip_resumes_mid_epoch():
    s = SameDatasetBatchSampler(RANGES, 4, "epoch", seed=1)
    full = list(s)
    s.skip = 5
    assert list(s) == full[5:]
    assert list(s) == full  # skip applies once


def test_too_small_dataset_errors():
    with pytest.raises(ValueError, match="lower data.batch_size"):
        SameDatasetBatchSampler([(0, 3)], 4, "epoch")
