"""Re-mine hard negatives with the model being trained, during fit (ANCE, Xiong et al. 2021, done once or a few times).

`RemineNegatives` is a Lightning callback. After the validation that ends each epoch listed in `after_epochs`, it
ranks the training queries with the current weights over the corpus of one evaluation set (task=beir: `dev`, whose
corpus is the training corpus), picks negatives with the same rule and code as `mine.py` (`negatives_for_rankings`),
writes them atomically to `<out_dir>/train.neg.epoch<N>.json`, and trains the following epochs on that file.

Cost: the validation that just ran encoded the corpus with these very weights, and `EvalSet.search` reads those
stores, so re-mining encodes only the training queries and searches them (no corpus pass). Under DDP every rank
takes part in the search (each searches its own corpus shards, as in evaluation) and rank 0 writes the file.

The learning-rate schedule keeps the length Lightning estimated from the first file: when the re-mined file has
more records (queries the first mining left without negatives now have some), the extra last steps run at the
schedule's end value (0), and with fewer the run ends before it decays to 0. `random_fill` keeps the count equal.

Resume: the files mined so far are part of the callback's state, saved in every checkpoint (Lightning runs this
callback's `on_validation_end` before its checkpoint callbacks'), so a resumed run trains on the file it trained on.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lightning import Callback

from embedder.data.jsonl import write_jsonl_atomic
from embedder.data.queries import load_queries
from embedder.data.train_files import load_train_file
from embedder.distributed import barrier, rank
from embedder.mining.negatives import NegativeRule, merge_negatives, negatives_for_rankings

log = logging.getLogger(__name__)


class RemineNegatives(Callback):
    """Re-mine the training file's negatives with the model being trained.

    Args:
        after_epochs: 1-based epochs after whose validation the negatives are mined again (e.g. `[1]`).
        queries: the query file to mine for (records with `pos_index` into the eval set's corpus): the original
            training queries, not a mined file.
        out_dir: where the re-mined files go.
        eval_set: the evaluation set whose corpus (and stores, and instructions) the queries are ranked against.
        hits, rank_range, rank_range_of, max_neg_num, relative_margin, random_fill, seed: as in `mine.py`
            (`NegativeRule`).
        merge_with: the file mined before training (e.g. BM25's): each query's re-mined negatives alternate with its
            negatives there (re-mined first, de-duplicated, at most `max_neg_num`: `merge_negatives`, as
            `beir.negatives.retrievers=[bm25,dense]` merges two miners); None = the re-mined negatives alone.
    """

    def __init__(self, after_epochs: Sequence[int], queries: str, out_dir: str, eval_set: str = "dev",
                 hits: int = 100, rank_range: Sequence[int | None] = (0, None), max_neg_num: int = 100,
                 relative_margin: float | None = None, random_fill: int | None = None, seed: int = 42,
                 merge_with: str | None = None, rank_range_of: str = "ranking"):
        self.after_epochs = sorted({int(e) for e in after_epochs})
        if any(e < 1 for e in self.after_epochs):
            raise ValueError(f"after_epochs are 1-based epoch numbers, got {list(after_epochs)}")
        self.rule = NegativeRule.for_hits(hits, rank_range, rank_range_of=rank_range_of, max_neg_num=int(max_neg_num),
                                          relative_margin=relative_margin, random_fill=random_fill)
        self.queries, self.out_dir, self.eval_set = queries, out_dir, eval_set
        self.hits, self.seed, self.merge_with = int(hits), int(seed), merge_with
        self.mined: dict[int, str] = {}  # epoch -> the file mined after it (checkpointed)

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not trainer.reload_dataloaders_every_n_epochs:
            trainer.reload_dataloaders_every_n_epochs = 1  # the next epoch's loader is built from the new file

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.mined:  # a resumed run: the epochs after the last re-mining train on its file
            self._train_on(trainer, self.mined[max(self.mined)])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # the "before" evaluation, or Lightning's sanity check
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # a validation inside the epoch (val_check_interval)
        epoch = trainer.current_epoch + 1  # the epoch that just ended, 1-based
        last = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        if epoch not in self.after_epochs or epoch in self.mined or (last is not None and epoch >= last):
            return
        self.mined[epoch] = self._mine(trainer, pl_module, epoch)
        self._train_on(trainer, self.mined[epoch])

    def state_dict(self) -> dict[str, Any]:
        return {"mined": {str(k): v for k, v in self.mined.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mined = {int(k): v for k, v in (state_dict.get("mined") or {}).items()}

    # ------------------------------------------------------------------------------------------ the work
    def _mine(self, trainer, pl_module, epoch: int) -> str:
        sets = {es.name: es for es in getattr(pl_module, "eval_sets", [])}
        if self.eval_set not in sets:
            raise ValueError(f"re-mining ranks against eval set {self.eval_set!r}, which this run does not have "
                             f"(it has: {sorted(sets) or 'none'})")
        es = sets[self.eval_set]
        queries = load_queries(self.queries, len(es.corpus))
        log.info("re-mining negatives for %d queries with the weights after epoch %d (corpus of eval set %s)",
                 len(queries), epoch, self.eval_set)
        scores, ids = es.search(pl_module.encoder, list(queries.queries), self.hits, step=trainer.global_step)
        path = os.path.join(self.out_dir, f"train.neg.epoch{epoch}.json")
        if rank() == 0:
            dropped, counts = Counter(), Counter()
            remined = path if self.merge_with is None else os.path.splitext(path)[0] + ".remined.json"
            written = write_jsonl_atomic(remined, negatives_for_rankings(queries, ids, scores, es.corpus, self.rule,
                                                                         self.seed, dropped, counts))
            filled = (f", {counts['filled']} filled with {counts['random negatives']} random negatives"
                      if self.rule.random_fill else "")
            log.info("re-mined %d of %d queries into %s (%d with no negatives left%s); dropped candidates: %s",
                     written, len(queries), remined, counts["no negatives"], filled, dict(dropped) or "none")
            if self.merge_with is not None:
                merged = write_jsonl_atomic(path, merge_negatives(self.queries, [remined, self.merge_with],
                                                                  self.rule.max_neg_num))
                log.info("merged them with the negatives of %s into %s: %d records", self.merge_with, path, merged)
        barrier()  # the file is written before any rank reads it
        return path

    def _train_on(self, trainer, path: str) -> None:
        dm = trainer.datamodule
        old = dm.files[0]
        dm.replace_train_files([load_train_file(path, dm.tasks, old.task, dm.seed)])
        log.info("the next epochs train on %s (%d records; before: %d)", path, len(dm.files[0].records),
                 len(old.records))
