"""Progress with a rate and an ETA that stays readable in SLURM logs and `nohup` files.

On a terminal this is a tqdm bar. Elsewhere tqdm's carriage-return redraws turn a log file into one unreadable
line, so `Progress` logs a plain line at every 10% or every 30 s instead (and a last one at the end, for jobs that
ran long enough to log at all). Lightning's bars cover the training loop only; this covers the data jobs (download,
extraction, validating a 16 GB training file, indexing a 54M-line corpus).
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def fmt_size(n: float | None) -> str:
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB): the one helper behind every "peak RSS" the logs print."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """`done` of `total` units; `update(n)` adds n, `finish()` (or leaving the `with` block) ends it.

    `unit="B"` formats sizes (`1.2 GB / 16.9 GB`); any other unit counts (`1,200,000 / 54,000,000 rows`).
    Example log line: `validating train.json: 40% (6.8 GB / 16.9 GB), 1m12s elapsed, ETA 1m48s`.
    """

    def __init__(self, label: str, total: float | None, unit: str = "B", step: float = 0.1, interval: float = 30.0,
                 quiet_below: float = 5.0, logger: logging.Logger | None = None):
        self.log = logger or log
        self.label, self.total, self.unit, self.done = label, total or None, unit, 0
        self.step, self.interval, self.quiet_below = step, interval, quiet_below
        self.start = self.last_time = time.monotonic()
        self.last_frac, self.logged = 0.0, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=label, unit=unit, unit_scale=unit == "B", unit_divisor=1000,
                            mininterval=1.0, leave=False)

    def _amount(self, n: float) -> str:
        return fmt_size(n) if self.unit == "B" else f"{int(n):,} {self.unit}"

    def update(self, n: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        frac = self.done / self.total if self.total else 0.0
        if now - self.start < self.quiet_below:  # short jobs stay quiet
            return
        if frac - self.last_frac >= self.step or now - self.last_time >= self.interval:
            self.last_frac, self.last_time, self.logged = frac, now, self.done
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        if not self.total:
            return f"{self.label}: {self._amount(self.done)}, {fmt_time(elapsed)} elapsed"
        frac = min(1.0, self.done / self.total)
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        return (f"{self.label}: {frac:4.0%} ({self._amount(self.done)} / {self._amount(self.total)}), "
                f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta) if eta is not None else '?'}")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.logged and self.done != self.logged:
            self.log.info("%s", self.line())  # the last line says 100%

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        elif self.bar is not None:
            self.bar.close()
