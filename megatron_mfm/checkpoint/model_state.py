"""Model-only megatron dist checkpoints: save, load (any TP layout) and global-tensor access.

A checkpoint directory holds megatron ``dist_checkpointing`` files plus ``mfm_config.json``
(the architecture), so tools can rebuild the model without other inputs. Directories are written
under a temporary name and renamed when every rank has finished: a half-written checkpoint never
carries the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from tqdm import tqdm

from megatron_mfm.checkpoint.layout import (
    CONFIG_FILE,
    CheckpointError,
    EMA_PREFIX,
    TRAINING_STATE_PREFIXES,
    is_complete,
    resolve_checkpoint,
)
from megatron_mfm.checkpoint.verify import verify_checkpoint
from megatron_mfm.export.key_map import groups_from_official, groups_from_ours
from megatron_mfm.model.config import MfMConfig, architecture_of, make_config
from megatron_mfm.model.dit import MfMDiT
from megatron_mfm.parallel.mcore_version import load_dist_checkpoint


EXTRA_STATE = "_extra_state"


def _sharded_tensors(model: MfMDiT) -> dict[str, ShardedTensor]:
    """Model state as ShardedTensors keyed by their global checkpoint key."""
    return {
        sh.key: sh
        for sh in model.sharded_state_dict().values()
        if isinstance(sh, ShardedTensor)
    }


def save_model(model: MfMDiT, path: str | Path) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the directory."""
    path = Path(path)
    rank = dist.get_rank()
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new --save path or remove it")
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(architecture_of(model.config), indent=2) + "\n")
        os.replace(tmp, path)
    dist.barrier()
    return path


def read_config(path: str | Path, **overrides) -> MfMConfig:
    """The architecture saved with a checkpoint, with megatron overrides (TP, SP, dtype...)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {path} is not a megatron_mfm checkpoint")
    return make_config(**{**json.loads(config_path.read_text()), **overrides})


def check_shapes(model: MfMDiT, path: str | Path) -> None:
    """Fail, naming the first mismatching keys, unless the checkpoint matches the model."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    expected = _sharded_tensors(model)
    problems = []
    for key, sh in expected.items():
        if key not in saved:
            problems.append(f"{key}: missing from checkpoint (model expects {tuple(sh.global_shape)})")
        elif tuple(saved[key].global_shape) != tuple(sh.global_shape):
            problems.append(
                f"{key}: checkpoint {tuple(saved[key].global_shape)} vs model {tuple(sh.global_shape)}"
            )
    # Under pipeline parallelism each stage holds a subset: compare with the keys of all ranks.
    everywhere: list = [None] * dist.get_world_size()
    dist.all_gather_object(everywhere, sorted(expected))
    known = set().union(*everywhere)
    unexpected = [k for k in sorted(set(saved) - known) if not k.startswith(TRAINING_STATE_PREFIXES)]
    problems += [f"{key}: in checkpoint but not in the model" for key in unexpected]
    if problems:
        shown = "\n  ".join(problems[:8])
        raise CheckpointError(
            f"checkpoint {path} does not match the model config ({len(problems)} problems):\n  {shown}"
        )


def load_model(model: MfMDiT, path: str | Path) -> None:
    """Load a checkpoint saved at any TP layout into ``model`` (collective)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete dist checkpoint (no metadata.json)")
    verify_checkpoint(path)
    check_shapes(model, path)
    request = _saved_extra_states_only(model.sharded_state_dict(), path)
    loaded = load_dist_checkpoint(request, path)
    # A training checkpoint also returns its common (non-tensor) state: keep the model's part.
    state = to_local_keys(model, {k: v for k, v in loaded.items() if k in request})
    # Modules whose extra state the checkpoint lacks keep their own: TE's modules, unlike
    # megatron's local linears, have no default for a missing one in a strict load.
    for key, value in model.state_dict().items():
        if key.endswith(EXTRA_STATE):
            state.setdefault(key, value)
    model.load_state_dict(state)


def _saved_extra_states_only(request: dict, path: Path) -> dict:
    """``request`` without the modules' extra states (FP8 metadata, not weights) that the
    checkpoint lacks: one trained with another core attention (FA4 has none, TE's has one) loads
    into this model (an H200 evaluation failed so). The weights stay strict (``check_shapes``)."""
    saved = load_sharded_metadata(str(path))
    return {name: sh for name, sh in request.items()
            if not (isinstance(sh, ShardedObject) and sh.key.endswith(EXTRA_STATE) and sh.key not in saved)}


@torch.no_grad()
def load_ema_weights(model: MfMDiT, path: str | Path) -> None:
    """Replace the model's weights by the EMA saved in a training checkpoint, read straight into
    the parameters (no second copy of the weights; collective)."""
    verify_checkpoint(path)
    request = {EMA_PREFIX + sh.key: dataclasses.replace(sh, key=EMA_PREFIX + sh.key)
               for sh in _sharded_tensors(model).values()}
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    missing = [key for key in request if key not in saved]
    if missing:
        raise KeyError(f"{path} has no EMA weights (e.g. {missing[0]}); export the raw weights instead")
    loaded = load_dist_checkpoint(request, path)
    for key, sh in request.items():
        if loaded[key] is not sh.data:
            sh.data.copy_(loaded[key])


def build_from_checkpoint(path: str | Path, weights: str = "raw", backend: str = "local",
                          attention_backend: str | None = None, **overrides) -> MfMDiT:
    """The model of a checkpoint (or save directory) for this rank's layout, with its raw or
    EMA weights (collective; ``overrides`` set the layout: TP, PP, SP...; ``attention_backend``
    a concrete core attention, None: the layer spec's default)."""
    from megatron_mfm.model.dit import build_model
    from megatron_mfm.model.specs import default_layer_spec

    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights!r}: choose raw or ema")
    path = resolve_checkpoint(path)
    model = build_model(read_config(path, **overrides), default_layer_spec(backend, attention_backend))
    load_model(model, path)
    if weights == "ema":
        load_ema_weights(model, path)
    return model


def build_from_official(folder: str | Path, backend: str = "local", attention_backend: str | None = None,
                        **overrides) -> MfMDiT:
    """The model of an official ``transformer/`` folder (or a pipeline folder holding one), for
    this rank's layout; weights are read tensor by tensor straight into the parameters."""
    from megatron_mfm.export.official_io import OfficialWeights
    from megatron_mfm.model.config import from_official_config
    from megatron_mfm.model.dit import build_model
    from megatron_mfm.model.specs import default_layer_spec

    folder = Path(folder)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    with OfficialWeights(folder) as weights:
        config = from_official_config(weights.config, **overrides)
        model = build_model(config, default_layer_spec(backend, attention_backend))
        groups = {g.ours: g for g in groups_from_official(weights.keys(), config)}
        _fill(model, lambda key: groups[key].fuse([weights.get(n) for n in groups[key].official])
              if key in groups else None, progress=f"reading {folder}")
        _check_all_used(folder, weights.keys(), [groups[k] for k in _sharded_tensors(model) if k in groups])
    return model


def _check_all_used(folder: Path, keys: list[str], used_groups: list) -> None:
    """Fail unless every tensor of the folder went into the model (of some rank; collective):
    weights that config.json does not describe are an error, never silently dropped."""
    everywhere: list = [None] * dist.get_world_size()
    dist.all_gather_object(everywhere, sorted({name for g in used_groups for name in g.official}))
    unused = sorted(set(keys) - set().union(*everywhere))
    if unused:
        raise CheckpointError(
            f"{folder}: {len(unused)} of {len(keys)} tensors are not part of the model that its config.json "
            f"describes (e.g. {unused[:3]}); fix config.json (num_layers, ...) to match the weights"
        )


def to_local_keys(model: MfMDiT, state: dict) -> dict:
    """Map the (global-layer-index) sharded keys back to this stage's module names."""
    renamed = {}
    for layer_index, layer in enumerate(model.layers):
        old, new = f"layers.{layer.layer_number - 1}.", f"layers.{layer_index}."
        for key in [k for k in state if k.startswith(old)]:
            renamed[new + key[len(old):]] = state.pop(key)
    renamed.update(state)
    return renamed


def fill_from_global(model: MfMDiT, state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every parameter from global (unsharded) tensors."""
    _fill(model, state.get)


@torch.no_grad()
def _fill(model: MfMDiT, global_tensor: Callable[[str], torch.Tensor | None], progress: str = "") -> None:
    """Copy this rank's shard of every parameter from ``global_tensor(key)`` (None: missing),
    one tensor at a time."""
    missing = []
    items = list(_sharded_tensors(model).values())
    show = bool(progress) and dist.get_rank() == 0
    for sh in tqdm(items, desc=progress, unit="tensor", disable=not show):
        full = global_tensor(sh.key)
        if full is None:
            missing.append(sh.key)
            continue
        if tuple(full.shape) != tuple(sh.global_shape):
            raise ValueError(f"{sh.key}: given {tuple(full.shape)}, model expects {tuple(sh.global_shape)}")
        sh.data.copy_(full[sh.global_slice()])
    if missing:
        raise KeyError(f"{len(missing)} model tensors missing from the given state, e.g. {missing[:5]}")


def _single_process_tensors(model: MfMDiT) -> dict[str, ShardedTensor]:
    if parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("global tensors need a single-process model (TP=1, PP=1): build it with the default layout")
    return _sharded_tensors(model)


def global_state(model: MfMDiT) -> dict[str, torch.Tensor]:
    """Unsharded tensors of a single-process (TP=1, PP=1) model, keyed by checkpoint key."""
    return {key: sh.data.detach().clone() for key, sh in _single_process_tensors(model).items()}


class OfficialTensors:
    """The official tensors of a single-process model, made one key group at a time while
    iterated (for export without a second copy of the weights)."""

    def __init__(self, model: MfMDiT, dtype: torch.dtype | None = None):
        self._sharded = _single_process_tensors(model)
        self._groups = groups_from_ours(self._sharded, model.config)
        self._dtype = dtype

    def __len__(self) -> int:
        return sum(len(g.official) for g in self._groups)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self._groups:
            tensors = group.split(self._sharded[group.ours].data.detach())
            for name, tensor in zip(group.official, tensors):
                yield name, tensor if self._dtype is None else tensor.to(self._dtype)
