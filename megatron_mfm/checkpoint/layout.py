"""The on-disk layout of checkpoints: file and folder names, key prefixes, the ``latest`` pointer.

A training save directory::

    iter_0000010/   model, optimizer, EMA shards + common state + mfm_config.json
    latest          the name of the newest COMPLETE checkpoint
    history         the published checkpoints, oldest first

A model-only checkpoint is one such folder (dist checkpoint + ``mfm_config.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
# The published checkpoints in the order they were written (pruning keeps the newest by this).
HISTORY = "history"
CONFIG_FILE = "mfm_config.json"
# Written last by megatron's dist_checkpointing: its presence marks a complete dist checkpoint.
METADATA_FILE = "metadata.json"

# Keys of the tensors and objects a training checkpoint holds besides the model's.
EMA_PREFIX = "ema."
OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng_state"
TRAINING_STATE_PREFIXES = (EMA_PREFIX, OPTIMIZER_PREFIX, RNG_PREFIX)

_ITERATION = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt or unsafe); the message names the file."""


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def iteration_of(folder: str | Path) -> int | None:
    """The iteration of a published ``iter_XXXXXXX`` folder name, or None for anything else."""
    match = _ITERATION.match(Path(folder).name)
    return int(match[1]) if match else None


def is_complete(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a training save directory, or None."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(save_dir) / pointer.read_text().strip()
    if not is_complete(path):
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory given either itself or a save directory with ``latest``."""
    return latest_checkpoint(path) or Path(path)
