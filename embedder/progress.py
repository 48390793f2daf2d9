"""Progress lines with a rate and an ETA that stay readable in SLURM logs and `nohup` files.

tqdm redraws one line with carriage returns, which a log file turns into one unreadable line; Lightning's bars
are for the training loop only. `Progress` logs a plain line every `interval` seconds (and at the end) instead.
"""

from __future__ import annotations

import logging
import time


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`done` of `total` units (bytes, rows, ...); `update(n)` adds, `finish()` logs the last line.

    Example: `validating train.json: 1.2 GB / 16.9 GB (7%), 95 MB/s, elapsed 0:00:13, ETA 0:02:45`.
    """

    def __init__(self, what: str, total: float | None, unit: str = "B", interval: float = 30.0,
                 logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.interval = what, total, unit, float(interval)
        self.log = logger or logging.getLogger("embedder")
        self.done = 0.0
        self.start = self.last = time.monotonic()

    def _amount(self, x: float) -> str:
        if self.unit != "B":
            return f"{int(x):,}"
        for name, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if x >= size:
                return f"{x / size:.1f} {name}"
        return f"{int(x)} B"

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = "/s" if self.unit == "B" else f" {self.unit}/s"
        text = f"{self.what}: {self._amount(self.done)}"
        if self.total:
            text += f" / {self._amount(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {self._amount(rate)}{unit}, elapsed {_fmt_seconds(elapsed)}"
        if self.total and rate > 0:
            text += f", ETA {_fmt_seconds((self.total - self.done) / rate)}"
        return text

    def update(self, n: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.log.info("%s", self.line())

    def finish(self) -> None:
        if time.monotonic() - self.start >= self.interval:  # short jobs stay quiet
            self.log.info("%s (done)", self.line())
