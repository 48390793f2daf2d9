"""Host memory of the training process: glibc's malloc, kept from growing step after step on a CPU.

Hand-written because no library exposes `mallopt`/`malloc_trim`: PyTorch CPU tensors come from glibc's malloc. Its
mmap threshold adapts upwards after every large free (up to 32 MB), so a training step's activations soon come from
the heap, and each intra-op thread's arena keeps what it freed. When tensor sizes change from step to step (packed
batches: every batch has its own token count), the freed pieces do not fit the next step's tensors and the resident
size grows above what is live (MiniLM on SciFact, 16 queries × 3 keys × 256 tokens, packed, 2 cores: 4.3 GiB after
5 steps, 5.4 GiB after 80). The first fix is upstream: on CPU, `model.unpadded=auto` pads batches with little
padding, whose shapes repeat (3.9 GiB, flat). Measured knobs for the rest (docs/benchmarks.md, "Fine-tuning on a
BEIR folder"):
- `MallocTrim` (`callbacks.malloc_trim.every_n_steps`, off by default): `malloc_trim(0)` after every step hands the
  freed heap back (3.98 GiB on that packed run), but the next step faults those pages in again: +23% CPU time.
  Every 4 steps: +9% CPU, but 4.81 GiB: the heap regrows within a few steps;
- `host_malloc.mmap_threshold`: every allocation above it gets its own mapping, returned on free. The lowest peak
  (3.4 GiB), but every step faults its activations in afresh: +33% CPU time at 64 KB, so it is off by default in
  train.yaml. At 8 MiB only the activations are mapped (a packed MiniLM step on NFCorpus, 16 x 4 x 256 tokens: peak
  1.44 GiB instead of 2.9, +16-22% CPU per step; 32 MiB changes nothing, the 18 MB hidden states then stay on the
  heap): `task=beir`'s default since session 26, for its 4 GiB target on a CPU;
- `host_malloc.arena_max`: fewer per-thread arenas.
Transparent huge pages for PyTorch's allocations (`THP_MEM_ALLOC_ENABLE=1`, read once before the first tensor)
did not help that run: 5.05 GiB and +14% CPU; beside the 8 MiB threshold it halved that threshold's cost in a step
probe (`bench/step_memory.py`), not yet measured on whole runs. On other C libraries (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

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
    """`malloc_trim(0)` every `every_n_steps` training steps (0 = never) and, with `after_validation`, once after each
    evaluation, whose encode batches (length-sorted, every one its own shape) leave the heap fragmented before
    training resumes; once per evaluation costs nothing measurable. glibc only; elsewhere nothing."""

    def __init__(self, every_n_steps: int = 0, after_validation: bool = True):
        self.every_n_steps = max(0, int(every_n_steps))
        self.after_validation = bool(after_validation)

    def on_validation_end(self, trainer, pl_module):
        if self.after_validation:
            libc = _glibc()
            if libc is not None:
                libc.malloc_trim(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            libc = _glibc()
            if libc is not None:
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
