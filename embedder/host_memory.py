"""Host-memory settings of the training process: glibc's malloc, tuned so freed activation memory goes back to the OS.

Hand-written because no library exposes `mallopt`: PyTorch CPU tensors come from glibc's malloc. Its mmap threshold
adapts upwards after every large free (up to 32 MB), so a training step's activations soon come from the heap, and
each intra-op thread's arena keeps what it freed. The resident size then grows step after step above what is live
(MiniLM on SciFact, 16 queries × 3 keys × 256 tokens on 2 cores: 5.4 GB peak after 160 steps, 4.3 GB after 5).
A fixed threshold gives every allocation above it its own mapping, returned on free, and fewer arenas bound the rest
(the same 5 steps: 3.4 GB, the same losses). On other C libraries (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("embedder.host_memory")

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers (malloc.h)


def tune_malloc(mmap_threshold: int | None, arena_max: int | None) -> bool:
    """Apply glibc `mallopt` settings (None leaves one at glibc's default); True when glibc took them."""
    if mmap_threshold is None and arena_max is None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("no glibc mallopt here; host malloc settings left alone")
        return False
    ok = True
    if mmap_threshold is not None:
        ok &= mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    if arena_max is not None:
        ok &= mallopt(M_ARENA_MAX, int(arena_max)) == 1
    return bool(ok)
