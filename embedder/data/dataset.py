"""A map-style dataset over many training files whose groups are re-drawn every epoch from a seeded generator."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from embedder.data.kinds import RecordKind
from embedder.data.sampling import sample_group
from embedder.data.train_files import TrainFile


class MultiTaskTrainDataset(Dataset):
    """Concatenation of training files; item i is one freshly sampled group of file `file_of(i)`.

    The group for item i in epoch e is drawn with `np.random.default_rng([seed, e, i])`: every epoch gets new
    negatives (and a new positive for `select_positive=random`), and two runs with the same seed see the same
    groups, whatever the number of dataloader workers or devices. `positives`: also give each item its record's
    labelled positives (only `loss.mask_known_positives` reads them; NFCorpus queries have ~40).
    """

    def __init__(self, files: list[TrainFile], tasks: dict[str, RecordKind], seed: int = 42,
                 positives: bool = False):
        self.files = files
        self.tasks = tasks
        self.seed = int(seed)
        self.positives = bool(positives)
        self.epoch = 0
        self.offsets = np.cumsum([0] + [len(f.records) for f in files])  # (F+1,)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def ranges(self) -> list[tuple[int, int]]:
        """[start, end) index range of every file, for same-dataset batching."""
        return [(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def file_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = self.file_of(index)
        file = self.files[f]
        settings = self.tasks[file.task]
        record = file.records[index - int(self.offsets[f])]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        group = sample_group(record, settings.sampling, rng)
        inst = settings.instruction
        item = {
            "query": inst.query + group["query"],
            "keys": [inst.key + k for k in group["keys"]],
            "teacher_scores": group["teacher_scores"],
            "record_kind": file.task,
            "dataset": f,
            "path": file.path,
        }
        if self.positives:
            item["positives"] = [inst.key + k for k in group["positives"]]  # every labelled one, as keys are written
        return item
