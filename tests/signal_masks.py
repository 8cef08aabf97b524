"""Reading another process's signal masks (Linux /proc), for the pre-emption tests."""

from __future__ import annotations

import signal


def blocks_sigterm(pid: int) -> bool:
    """The process's blocked-signal mask has SIGTERM."""
    mask = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigBlk:"))
    return bool(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
