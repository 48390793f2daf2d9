"""RetrievalDataModule: serves the checked training files (`load_train_files`) as batches: samples groups per epoch,
batches by dataset, tokenises with the encoder's tokenizer. Everything it needs is passed in when it is built."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from embedder.data.batching import SameDatasetBatchSampler
from embedder.data.collator import RetrievalCollator
from embedder.data.dataset import MultiTaskTrainDataset
from embedder.data.kinds import RecordKind
from embedder.data.train_files import TrainFile, load_train_file, report
from embedder.data.workers import trainer_num_workers
from embedder.paths import resolve_files

log = logging.getLogger(__name__)


class RetrievalDataModule(LightningDataModule):
    """Training data for the dual encoder.

    Args:
        files: the training files, read and checked by `load_train_files` (before any model is loaded).
        tasks: `{kind: RecordKind}` for the records' `task` field.
        tokenizer: the encoder's tokenizer.
        batch_size: queries per device.
        inbatch_same_dataset: `epoch` (every global batch from one file), `epoch-static`, `random`,
            `epoch-random`, or `shuffle` (plain shuffling; every batch must still be one task).
        eval_sets: built evaluation sets; validation runs each one once per validation.
        positive_ids: give every batch each query's labelled positives' text ids (`loss.mask_known_positives`).
    """

    def __init__(self, files: list[TrainFile], tasks: dict[str, RecordKind], tokenizer, batch_size: int = 16,
                 query_max_length: int = 256, key_max_length: int = 256, inbatch_same_dataset: str = "epoch",
                 num_workers: int | str = "auto", seed: int = 42, eval_sets: list[Any] | None = None,
                 positive_ids: bool = False):
        super().__init__()
        self.files, self.tasks = list(files), tasks
        self.tokenizer, self.batch_size, self.mode = tokenizer, int(batch_size), inbatch_same_dataset
        self.collator = RetrievalCollator(tokenizer, query_max_length, key_max_length, positive_ids=positive_ids)
        self.num_workers, self.seed = num_workers, int(seed)
        self.eval_sets = list(eval_sets or [])
        self.dataset = self._dataset()

    def replace_train_files(self, files: list[TrainFile]) -> None:
        """Train on other files from the next epoch on (re-mined negatives: `embedder.remine`); the trainer must
        rebuild the train loader then (`reload_dataloaders_every_n_epochs`)."""
        self.files = list(files)
        self.dataset = self._dataset()

    def _dataset(self) -> MultiTaskTrainDataset | None:
        return MultiTaskTrainDataset(self.files, self.tasks, self.seed, positives=self.collator.positive_ids) if self.files \
            else None

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise ValueError("no training files: set train_data")
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = _EpochBatchSampler(self.dataset, self.dataset.ranges(), self.batch_size, self.mode, self.seed,
                                     rank, world)
        # A private generator for the workers' base seed: creating an iterator then leaves the global torch RNG
        # alone, so a resumed run's dropout stream continues exactly where the checkpoint left it.
        generator = torch.Generator().manual_seed(self.seed)
        workers = trainer_num_workers(self.num_workers, self.trainer)
        return _ResumableDataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collator,
                                    num_workers=workers, persistent_workers=False, generator=generator,
                                    position_fn=self._position)

    def val_dataloader(self) -> DataLoader:
        # One item per evaluation set; the LightningModule evaluates the whole set in one step.
        return DataLoader(list(range(len(self.eval_sets))), batch_size=1, collate_fn=lambda x: x)

    def _position(self) -> dict[str, int]:
        """Where training is inside the epoch: read from Lightning's loop progress, which (unlike counting
        yielded batches) is not fooled by the prefetched batch."""
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        return {"epoch": int(loop.epoch_progress.current.completed),
                "batches": int(loop.epoch_loop.batch_progress.current.processed)}


class _ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as stateful: its position is saved in every checkpoint and, on
    `ckpt_path=...`, restored before iteration, so a resumed run continues at the next unseen batch."""

    def __init__(self, *args, position_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self._position_fn = position_fn

    def state_dict(self) -> dict[str, int]:
        return self._position_fn()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches"]))


class _EpochBatchSampler(SameDatasetBatchSampler):
    """The batch sampler also tells the dataset the epoch, so groups are re-drawn every epoch."""

    def __init__(self, dataset: MultiTaskTrainDataset, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset = dataset
        self._resume_epoch: int | None = None
        self._resume_batches = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        if self._resume_epoch == epoch:
            self.skip, self._resume_epoch = self._resume_batches, None

    def resume_at(self, epoch: int, batches: int) -> None:
        self._resume_epoch, self._resume_batches = epoch, batches
        self.set_epoch(epoch)

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)
        yield from super().__iter__()


__all__ = ["RetrievalDataModule"]


def load_train_files(train_data: list[str] | str, data_root: str | None, tasks: dict[str, RecordKind],
                     default_task: str | None = None, seed: int = 42) -> list[TrainFile]:
    """Read and check every training file (records fail here, with file, line and field, before any model is
    loaded); memory holds each file's offsets, not its records. Logs what each file holds and what was dropped."""
    paths = resolve_files(train_data, data_root, what="train_data")
    names: Counter = Counter()
    files = [load_train_file(p, tasks, default_task, seed, names) for p in paths]
    log.info("training files (records dropped by design are counted here):\n%s", report(files))
    return files
