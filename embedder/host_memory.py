"""Host memory of the training process: glibc's malloc, kept from growing step after step on a CPU.

Hand-written because no library exposes `mallopt`/`malloc_trim`: PyTorch CPU tensors come from glibc's malloc. Its
mmap threshold adapts upwards after every large free (up to 32 MB), so a training step's activations soon come from
the heap, and each intra-op thread's arena keeps what it freed. The resident size then grows above what is live
(MiniLM on SciFact, 16 queries × 3 keys × 256 tokens on 2 cores: 4.3 GB after 5 steps, 5.4 GB after 160).
Measured fixes (docs/benchmarks.md, "Fine-tuning on a BEIR folder"):
- `MallocTrim` (the default, `callbacks.malloc_trim`): `malloc_trim(0)` after every step hands the freed heap back
  (3.98 GB peak after 160 steps), but the next step faults those pages in again: +23% CPU time on that run;
- `host_malloc.mmap_threshold`: every allocation above it gets its own mapping, returned on free. The lowest peak
  (3.4 GB), but every step faults its activations in afresh: +33% CPU time on that run, so it is off by default;
- `host_malloc.arena_max`: fewer per-thread arenas.
On other C libraries (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("embedder.host_memory")

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers (malloc.h)


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle, or None; cached here, never stored on a callback (a CDLL cannot be pickled for DDP spawn)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist only in glibc)
        return libc
    except (OSError, AttributeError):
        return None


class MallocTrim(Callback):
    """`malloc_trim(0)` every `every_n_steps` training steps (glibc only; elsewhere nothing)."""

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = max(1, int(every_n_steps))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        libc = _glibc()
        if libc is not None and trainer.global_step % self.every_n_steps == 0:
            libc.malloc_trim(0)


def tune_malloc(mmap_threshold: int | None, arena_max: int | None) -> bool:
    """Apply glibc `mallopt` settings (None leaves one at glibc's default); True when glibc took them."""
    if mmap_threshold is None and arena_max is None:
        return False
    libc = _glibc()
    if libc is None:  # not glibc: nothing to tune
        log.debug("no glibc mallopt here; host malloc settings left alone")
        return False
    mallopt = libc.mallopt
    ok = True
    if mmap_threshold is not None:
        ok &= mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    if arena_max is not None:
        ok &= mallopt(M_ARENA_MAX, int(arena_max)) == 1
    return bool(ok)
