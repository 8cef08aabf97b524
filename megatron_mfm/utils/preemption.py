"""Helper processes that outlive a pre-emption signal until the training process has saved.

A scheduler's SIGTERM (``scancel``, ``timeout``, a pre-empting cluster) often reaches every
process of the job at once: the training process then saves and stops, and needs its data
workers for one more step and the asynchronous checkpoint writer (megatron's, with the
processes it spawns) to finish. Processes started inside ``children_shielded`` are born with
SIGTERM and SIGINT blocked (a blocked signal mask survives fork and exec), so they never act on
them; the training process gets any such signal as soon as the block is lifted.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

PREEMPTION_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def children_shielded() -> Iterator[None]:
    """Block the pre-emption signals in this thread while processes are started."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
