"""Small Lightning callbacks that no library provides in this form."""

from __future__ import annotations

import time

from lightning import Callback


class QueriesPerSecond(Callback):
    """Logs `train/queries_per_sec` (all devices) to the loggers and the progress bar.

    Lightning's ThroughputMonitor needs FLOP counts for its headline numbers and does not feed the progress
    bar; retrieval users think in queries (each with G keys) per second, so we log exactly that.
    """

    def __init__(self):
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        n = batch["query"]["input_ids"].shape[0] * trainer.world_size
        pl_module.log("train/queries_per_sec", n / max(dt, 1e-9), prog_bar=True, batch_size=1)
