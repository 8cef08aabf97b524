"""Save a tiny training checkpoint into SAVE_DIR on 2 gloo ranks and print what each rank raised
(run by tests/test_checkpoint_reliability.py inside a namespace with a small tmpfs at SAVE_DIR)."""

from __future__ import annotations

import os
import sys

from distributed import run_on_ranks


def save_once(save_dir: str) -> str:
    from megatron_mfm.config import load_config
    from megatron_mfm.parallel.initialize import initialize_parallel
    from megatron_mfm.training.loop import save, setup
    from test_checkpoint_reliability import TINY_RUN

    initialize_parallel(seed=1)
    trainer = setup(load_config(overrides=[*TINY_RUN, "train.global_batch_size=2", f"checkpoint.save={save_dir}"]))
    try:
        save(trainer)
    except Exception as error:
        return f"{type(error).__name__}: {error} | left: {sorted(os.listdir(save_dir))}"
    return "saved"


if __name__ == "__main__":
    for rank, outcome in enumerate(run_on_ranks(2, save_once, sys.argv[1])):
        print(f"rank {rank}: {outcome}")
