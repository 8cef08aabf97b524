"""Check a dist checkpoint before megatron reads it: nothing in it may run code, nothing is cut short.

torch.distributed.checkpoint reads ``.metadata`` with plain ``pickle`` and the objects stored in
the ``.distcp`` files (RNG states, extra states) with ``torch.load(weights_only=False)``; both
can run arbitrary code. Every load path of ours first passes the checkpoint through
``verify_checkpoint``: ``.metadata`` is unpickled with an allowlist of the classes a checkpoint
legitimately holds, the stored objects and ``common.pt`` with ``weights_only=True``, and every
stored item must lie inside its file (a truncated file is named, not an ``EOFError``).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_mfm.checkpoint.layout import CheckpointError

DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the .distcp files
COMMON_FILE = "common.pt"  # megatron's non-sharded state, up to megatron-core 0.18
COMMON_OBJECT = "common_state/shard_0_1"  # the same, stored in the .distcp files from megatron-core 0.19

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _AllowlistUnpickler(pickle.Unpickler):
    """Unpickles only the classes of ``_METADATA_CLASSES`` and torch dtypes."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _unsafe_or_corrupt(file: Path, error: Exception) -> CheckpointError:
    text = str(error)
    if "refused to load" in text or "Weights only load failed" in text:
        reason = text.splitlines()[0] if "refused" in text else _unsupported_global(text)
        return CheckpointError(f"{file}: not loaded, it holds code or objects a checkpoint never holds ({reason})")
    return CheckpointError(f"{file}: corrupt or truncated ({type(error).__name__}: {text.splitlines()[0] if text else ''})")


def _unsupported_global(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "unsupported object")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The ``.metadata`` of a dist checkpoint, unpickled with the allowlist."""
    file = Path(path) / DCP_METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{Path(path)}: not a dist checkpoint (no {DCP_METADATA_FILE})")
    try:
        with open(file, "rb") as stream:
            metadata = _AllowlistUnpickler(stream).load()
    except Exception as error:  # pickle raises many types on damaged input
        raise _unsafe_or_corrupt(file, error) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def _safe_torch_load(file: Path, data: bytes | None = None):
    try:
        source = io.BytesIO(data) if data is not None else file
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _unsafe_or_corrupt(file, error) from None


def _stored_bytes(path: Path, info) -> bytes:
    with open(path / info.relative_path, "rb") as stream:
        stream.seek(info.offset)
        return stream.read(info.length)


def read_common(path: str | Path) -> dict:
    """A checkpoint's non-sharded state read with ``weights_only=True``: ``common.pt`` (written by
    megatron-core 0.16) or the ``common_state`` object in the shards (0.19); {} if neither."""
    path = Path(path)
    file = path / COMMON_FILE
    if file.is_file():
        return _safe_torch_load(file)
    stored = {index.fqn: info for index, info in (read_dcp_metadata(path).storage_data or {}).items()}
    if COMMON_OBJECT not in stored:
        return {}
    info = stored[COMMON_OBJECT]
    return _safe_torch_load(path / info.relative_path, _stored_bytes(path, info))[0]


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``CheckpointError`` naming the file unless every part of the checkpoint is whole and safe."""
    path = Path(path)
    metadata = read_dcp_metadata(path)
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        file = path / info.relative_path
        if info.relative_path not in sizes:
            sizes[info.relative_path] = file.stat().st_size if file.is_file() else -1
        if sizes[info.relative_path] < 0:
            raise CheckpointError(f"{file}: missing (named by {path / DCP_METADATA_FILE})")
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(f"{file}: truncated ({sizes[info.relative_path]} bytes, "
                                  f"{index.fqn} needs {info.offset + info.length})")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if info.transform_descriptors:
                raise CheckpointError(f"{file}: {index.fqn} is stored transformed, which cannot be checked")
            _safe_torch_load(file, _stored_bytes(path, info))
    read_common(path)
