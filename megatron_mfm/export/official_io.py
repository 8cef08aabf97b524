"""Read and write the official MfM ``transformer/`` folder (diffusers layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_mfm.utils.atomic import atomic_directory

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"


def read_official(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from a folder with config.json and (sharded) safetensors."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: official transformer config.json not found")
    config = json.loads(config_path.read_text())
    if (folder / WEIGHTS_NAME).is_file():
        return config, load_file(folder / WEIGHTS_NAME)
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    weight_map = json.loads(index_path.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(folder / shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise KeyError(f"{index_path}: tensors listed but absent from the shards: {missing[:5]}")
    return config, state


def _write_transformer(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS_NAME)


def write_official(folder: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write config.json + one safetensors file; the folder appears only when complete."""
    with atomic_directory(folder) as tmp:
        _write_transformer(tmp, config, state)
    return Path(folder)


def write_pipeline(folder: str | Path, source: str | Path, config: dict, state: dict[str, torch.Tensor],
                   link: bool = False) -> Path:
    """A complete diffusers pipeline folder: our ``transformer/`` plus every other component
    (``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``...) copied,
    or symlinked with ``link``, from an official pipeline folder ``source``."""
    source = Path(source).resolve()
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source}: not a diffusers pipeline folder (no model_index.json)")
    with atomic_directory(folder) as tmp:
        for entry in sorted(source.iterdir()):
            if entry.name == "transformer":
                continue
            if link:
                (tmp / entry.name).symlink_to(entry)
            elif entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, tmp / entry.name)
        _write_transformer(tmp / "transformer", config, state)
    return Path(folder)
