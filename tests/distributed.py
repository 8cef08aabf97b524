"""Run a test body on N gloo processes and collect what each rank returns."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from conftest import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_on_ranks(world_size: int, fn: Callable, *args: Any) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(*args)``; return their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        # Our own files from our own child processes: full unpickling is safe here.
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
