"""Small Lightning callbacks that no library provides in this form."""

from __future__ import annotations

import logging
import math
import time

from lightning import Callback

log = logging.getLogger(__name__)


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


class LogProgress(Callback):
    """A progress line in the log every `every_s` seconds where no progress bar can draw (nohup, SLURM, CI logs):
    training (step, epoch, loss, queries/s, ETA) and predict-loop encoding (batches, texts/s, ETA).

    Lightning's bars redraw a terminal line; written to a file they show nothing useful, so a 100-step fine-tune
    logs nothing between its start and its final table. Active when stdout or stderr is not a terminal (or with
    `always=true`); rank 0 only.
    """

    def __init__(self, every_s: float = 30.0, always: bool = False):
        self.every_s, self.always = float(every_s), bool(always)
        self._start = self._last = 0.0
        self._last_step = 0
        self._queries = 0
        self._validating_s, self._val_start = 0.0, None  # time spent in validation during the fit

    def _active(self, trainer) -> bool:
        import sys

        return trainer.is_global_zero and (self.always or not (sys.stdout.isatty() and sys.stderr.isatty()))

    def on_train_start(self, trainer, pl_module):
        self._start = self._last = time.monotonic()
        self._last_step, self._queries = trainer.global_step, 0
        self._validating_s, self._val_start = 0.0, None

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module):
        if self._val_start is None:
            return
        now = time.monotonic()
        self._validating_s += now - self._val_start
        # the rate (and so the ETA) restarts after a validation: steps/s across it would count its minutes as
        # training (a line right after an epoch's evaluation once said "ETA 4h11m" for 4m32s)
        self._last, self._last_step, self._val_start = now, trainer.global_step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._queries += batch["query"]["input_ids"].shape[0] * trainer.world_size
        now = time.monotonic()
        if not self._active(trainer) or now - self._last < self.every_s:
            return
        from embedder.progress import fmt_time, peak_rss_gib

        step, total = trainer.global_step, trainer.estimated_stepping_batches
        total = int(total) if total is not None and math.isfinite(total) else None
        rate = (step - self._last_step) / (now - self._last)  # steps/s since the last line (validation left out)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        eta = fmt_time((total - step) / rate) if rate > 0 and total else "?"
        total_text = f"/{total}" if total else ""
        log.info("train: step %d%s, epoch %d%s, %.1f queries/s, %s elapsed, ETA %s, peak RSS %.2f GiB", step,
                 total_text, trainer.current_epoch + 1, loss_text,
                 self._queries / max(now - self._start - self._validating_s, 1e-9), fmt_time(now - self._start), eta,
                 peak_rss_gib())
        self._last, self._last_step = now, step

    def on_predict_start(self, trainer, pl_module):
        self._start = self._last = time.monotonic()
        self._texts_done = 0
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        self._texts_total = getattr(getattr(loader, "dataset", None), "num_texts", None)  # embedder's encode stream

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        now = time.monotonic()
        positions = batch.get("positions") if isinstance(batch, dict) else None
        self._texts_done += len(positions) if positions is not None else 0
        if not self._active(trainer) or now - self._last < self.every_s:
            return
        from embedder.progress import fmt_time

        elapsed = now - self._start
        done, total = self._texts_done, self._texts_total
        if done and total:  # texts: token-budget batches have no count in advance
            rate = done / max(elapsed, 1e-9)
            log.info("encoding: %s/%s texts (%.0f%%), %.0f texts/s, %s elapsed, ETA %s", f"{done:,}", f"{total:,}",
                     100 * done / total, rate, fmt_time(elapsed), fmt_time((total - done) / rate))
        else:
            totals = trainer.num_predict_batches
            total = totals[dataloader_idx] if dataloader_idx < len(totals) else None
            total = int(total) if total is not None and math.isfinite(total) else None  # inf: an iterable dataset
            done = batch_idx + 1
            eta = fmt_time(elapsed * (total - done) / done) if total else "?"
            log.info("encoding: batch %d/%s (%s), %s elapsed, ETA %s", done, total or "?",
                     f"{done / total:.0%}" if total else "?", fmt_time(elapsed), eta)
        self._last = now
