"""Read and write the official MfM ``transformer/`` folder (diffusers layout), tensor by tensor.

Reading opens the safetensors files lazily (one file or an index of shards) and materialises one
tensor per request. Writing consumes (name, tensor) pairs and flushes size-capped shards as they
fill, so beyond the tensors it is given the writer holds at most one shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_mfm.utils.atomic import atomic_directory

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the size transformers/diffusers users expect of a shard

Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class OfficialWeights:
    """The config and lazily read tensors of an official ``transformer/`` folder.

    Use as a context manager: the safetensors files stay open (memory-mapped) until exit.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: official transformer config.json not found")
        self.config: dict = json.loads(config_path.read_text())
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        try:
            self._file_of: dict[str, str] = self._weight_map()
        except BaseException:
            self._stack.close()  # the shards opened while checking the index
            raise

    def _weight_map(self) -> dict[str, str]:
        if (self.folder / WEIGHTS_NAME).is_file():
            return {key: WEIGHTS_NAME for key in self._open(WEIGHTS_NAME).keys()}
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
        weight_map = json.loads(index_path.read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            missing = sorted({k for k, s in weight_map.items() if s == shard} - set(self._open(shard).keys()))
            if missing:
                raise KeyError(f"{index_path}: tensors listed for {shard} but absent from it: {missing[:5]}")
        return weight_map

    def _open(self, name: str):
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard named by {self.folder / INDEX_NAME} not found")
            self._files[name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._files[name]

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its file now."""
        return self._open(self._file_of[key]).get_tensor(key)

    def __enter__(self) -> "OfficialWeights":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def parse_size(text: str) -> int:
    """Bytes of a size like ``5GB``, ``500MB``, ``64KB`` or ``1000`` (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if match is None:
        raise ValueError(f"size {text!r}: expected a number with an optional KB/MB/GB unit, e.g. 5GB")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[match[2]]
    size = int(float(match[1]) * unit)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def honour_umask(path: Path) -> None:
    """Give ``path`` the mode of a newly created file (0666 less the umask): safetensors writes
    its files 0600, which a serving user other than the exporter cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _shard_name(index: int, count: int) -> str:
    return WEIGHTS_NAME.replace(".safetensors", f"-{index:05d}-of-{count:05d}.safetensors")


def write_shards(folder: Path, tensors: Tensors, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``tensors`` into ``folder`` as one file, or as shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) plus the diffusers index. Each shard is written as
    soon as it is full and its tensors are released."""
    total = len(tensors) if isinstance(tensors, Sized) else None
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        part = folder / f".part-{len(parts):05d}.safetensors"
        save_file(pending, str(part), metadata={"format": "pt"})
        honour_umask(part)
        parts.append(part)
        pending, pending_bytes = {}, 0

    for name, tensor in tqdm(pairs, total=total, desc="writing tensors", unit="tensor"):
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        weight_map[name] = len(parts)
        pending_bytes += size
        total_bytes += size
    if pending or not parts:
        flush()
    if len(parts) == 1:
        os.replace(parts[0], folder / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    names = [_shard_name(i + 1, len(parts)) for i in range(len(parts))]
    for part, name in zip(parts, names):
        os.replace(part, folder / name)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_transformer(folder: Path, config: dict, tensors: Tensors, max_shard_bytes: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_shards(folder, tensors, max_shard_bytes)


def write_official(folder: str | Path, config: dict, tensors: Tensors,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write config.json + safetensors (sharded above ``max_shard_bytes``); the folder appears
    only when complete."""
    with atomic_directory(folder) as tmp:
        _write_transformer(tmp, config, tensors, max_shard_bytes)
    return Path(folder)


def write_pipeline(folder: str | Path, source: str | Path, config: dict, tensors: Tensors, link: bool = False,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A complete diffusers pipeline folder: our ``transformer/`` plus every other component
    (``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``...) copied,
    or symlinked with ``link``, from an official pipeline folder ``source``. Copies hold the
    files that symbolic links point to (a Hugging Face cache links every file to its blobs)."""
    source = Path(source).resolve()
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source}: not a diffusers pipeline folder (no model_index.json)")
    components = [entry for entry in sorted(source.iterdir()) if entry.name != "transformer"]
    _refuse_broken_links(components)
    with atomic_directory(folder) as tmp:
        for entry in components:
            if link:
                (tmp / entry.name).symlink_to(entry)
            elif entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        _write_transformer(tmp / "transformer", config, tensors, max_shard_bytes)
    return Path(folder)


def _refuse_broken_links(paths: list[Path]) -> None:
    """Name the first symbolic link under ``paths`` whose target is missing (an incomplete
    download), before anything is written."""
    for path in paths:
        for entry in _tree(path):
            if not entry.exists():
                raise FileNotFoundError(f"{entry}: a symbolic link to {os.readlink(entry)}, which does not exist")


def _tree(path: Path) -> Iterator[Path]:
    """``path`` and everything under it, through symbolic links."""
    yield path
    for folder, dirs, files in os.walk(path, followlinks=True):
        yield from (Path(folder) / name for name in dirs + files)
