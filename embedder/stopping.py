"""Prompt, safe stops on SIGTERM: what `kill <pid>`, SLURM (preemption, time limit) and Kubernetes send.

The handler only records the signal. Long loops poll `check()` between units of work (an encode batch, an LM
scoring batch, a run of corpus lines), and Lightning stops its own fit/validate loops at the next batch boundary
(it chains this handler, see its signal connector). So a stop lands between units, never inside a write: atomic
writers finish or remove their temp file, checkpoints stay whole, finished shards and scored parts stay on disk and
are reused, and `ckpt_path=last` resumes training. The command then exits with status 143 (128 + SIGTERM) and one
line saying where it stopped. Without this, Lightning's own handler only logs "Received SIGTERM" and an in-training
evaluation of a large corpus went on encoding for minutes.

Hand-written because neither Lightning (it polls between its own batches only) nor torch offers a stop flag that
code outside the trainer's loops can poll.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM  # 143: what shells and schedulers report for a SIGTERM'd job
_received: int | None = None


class StopRequested(Exception):
    """Raised by `check()` once SIGTERM has arrived."""


def install() -> None:
    """Record SIGTERM (chaining to a handler that was there before); main thread only, a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        global _received
        if _received is None:
            log.warning("SIGTERM received: stopping at the next safe point (finished work stays on disk; "
                        "resume training with ckpt_path=last)")
        _received = signum
        if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def requested() -> bool:
    return _received is not None


def check(where: str = "") -> None:
    """Raise StopRequested when SIGTERM has arrived; call it between units of work."""
    if _received is not None:
        raise StopRequested(f"stopped on SIGTERM{f' while {where}' if where else ''}")
