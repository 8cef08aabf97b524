"""Training checkpoints with megatron dist_checkpointing: the full training state (model,
optimizer, EMA shards; common state: scheduler, iteration, data state, RNG states, run config) in
the layout of ``megatron_mfm/checkpoint/layout.py``.

A checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed, then ``latest`` is replaced
atomically; so an interrupted save (crash, SIGKILL, full disk) leaves ``latest`` pointing at the
previous complete checkpoint, and the stray ``.tmp`` is removed by the next save. Model keys are
the same as the model-only checkpoints of ``megatron_mfm/checkpoint/model_state.py``, so the converter reads
training checkpoints directly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_mfm.checkpoint.layout import (
    CONFIG_FILE,
    EMA_PREFIX,
    HISTORY,
    LATEST,
    CheckpointError,
    RNG_PREFIX,
    iteration_dir,
    iteration_of,
    latest_checkpoint,
)
from megatron_mfm.checkpoint.model_state import to_local_keys
from megatron_mfm.checkpoint.verify import read_common, read_dcp_metadata, verify_checkpoint
from megatron_mfm.config import ConfigError
from megatron_mfm.model.config import architecture_of
from megatron_mfm.model.dit import ModelChunks
from megatron_mfm.parallel.mcore_version import load_dist_checkpoint, save_dist_checkpoint
from megatron_mfm.utils.atomic import fsync_dir, fsync_tree, is_disk_full
from megatron_mfm.utils.preemption import children_shielded


class ShardedEMA(Protocol):
    """What a checkpoint needs of the EMA (``megatron_mfm/training/ema.py``): keys ``ema.<model key>``."""

    def sharded_state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainingState:
    """Everything besides tensors that a resumed run needs."""

    iteration: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0
    """Undecodable samples replaced since this launch started, over all DP ranks (logged; the
    loaders count afresh after a resume)."""
    sidecar_misses: int = 0
    """Sample parts encoded in the step although sidecars are configured, since this launch
    started, over all DP ranks (logged, like ``skipped_samples``)."""


def _rng_object() -> ShardedObject:
    """This rank's RNG states, keyed by world size: they are restored only on the same layout
    (training randomness is derived from sample ids, so a new layout loses nothing)."""
    states = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject(f"{RNG_PREFIX}_world{world}", states, (world,), (rank,), replica_id=0)


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _state(model: ModelChunks, optimizer, ema: ShardedEMA | None, optimizer_format: str | None, loading: bool) -> dict:
    """The sharded state of a checkpoint; ``optimizer_format`` is the distributed optimizer's
    sharding type (None for the regular optimizer)."""
    sharded = model.sharded_state_dict()
    kwargs = {"metadata": {"distrib_optim_sharding_type": optimizer_format}} if optimizer_format else {}
    state: dict[str, Any] = dict(sharded)
    state["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=loading, **kwargs)
    if ema is not None:
        state.update(ema.sharded_state_dict())
    if not loading:
        state["rng_state"] = _rng_object()
    return state


@dataclass
class SaveReport:
    """One published checkpoint: how long training waited for it, how long it took in all (the
    same unless saved asynchronously), and its size (known on rank 0; 0 elsewhere)."""

    iteration: int
    blocking_seconds: float
    total_seconds: float
    bytes: int

    def metrics(self) -> dict[str, float]:
        return {
            "checkpoint/blocking seconds": self.blocking_seconds,
            "checkpoint/background seconds": self.total_seconds - self.blocking_seconds,
            "checkpoint/size (GB)": self.bytes / 2**30,
            "checkpoint/throughput (GB/s)": self.bytes / 2**30 / max(self.total_seconds, 1e-9),
        }


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Checkpointer:
    """Saves (optionally asynchronously), publishes, prunes and loads training checkpoints."""

    def __init__(self, save_dir: str, keep_last: int, async_save: bool, distributed_optimizer: bool,
                 reshardable_optimizer: bool = True):
        self.save_dir = Path(save_dir) if save_dir else None
        self.keep_last, self.async_save = keep_last, async_save
        # fully_reshardable: per-parameter state gathered over DP, loadable at any TP/PP/DP layout;
        # dp_reshardable: each rank writes its flat DP shard in parallel, loadable at another DP size.
        self.save_format = None
        if distributed_optimizer:
            self.save_format = "fully_reshardable" if reshardable_optimizer else "dp_reshardable"
        self.queue = AsyncCallsQueue() if async_save else None
        self.finished: list[SaveReport] = []
        """Saves published since ``take_finished`` was last called."""

    def save(self, iteration: int, model: ModelChunks, optimizer, scheduler, ema: ShardedEMA | None, data_state: dict,
             training: TrainingState, run_config: dict) -> None:
        """Collective. Returns once the files are written (or queued, with async_save); raises
        ``CheckpointError`` on every rank when any rank fails to write or publish."""
        if self.save_dir is None:
            return
        self.wait()  # one checkpoint in flight at a time
        start = time.perf_counter()
        returned: list[float] = []  # when save() returned (set before an async publish runs)
        final = iteration_dir(self.save_dir, iteration)
        tmp = final.with_name(final.name + ".tmp")
        state = _state(model, optimizer, ema, self.save_format, loading=False)
        state.update(
            scheduler=scheduler.state_dict(), data=data_state, iteration=iteration,
            training=training.__dict__.copy(), run_config=run_config,
        )
        self._prepare(tmp, _bytes_written_by_all_ranks(state))
        architecture = architecture_of(model.config)

        def publish() -> None:
            size = _tree_bytes(tmp) if dist.get_rank() == 0 else 0
            failure = None
            if dist.get_rank() == 0:
                try:
                    self._publish(tmp, final, architecture)
                except Exception as error:
                    failure = error
            _agree(failure, final, tmp)
            total = time.perf_counter() - start
            self.finished.append(SaveReport(iteration, returned[0] if returned else total, total, size))

        if not self.async_save:
            self._write(state, tmp, final)
            dist.barrier()
            publish()
            return
        # megatron's asynchronous writer starts processes (a results manager on the first save,
        # a writer each save) that must finish a pre-empted run's final save
        with children_shielded():
            request = self._write(state, tmp, final)
            request.add_finalize_fn(publish)
            self.queue.schedule_async_request(request)
        returned.append(time.perf_counter() - start)

    def _write(self, state: dict, tmp: Path, final: Path):
        """megatron's save of ``state`` into ``tmp`` (with async_save, the request to schedule)."""
        try:
            return save_dist_checkpoint(state, tmp, self.async_save)
        except Exception as error:  # megatron raises the write failures on every rank
            _agree(error, final, tmp)  # raises

    def _prepare(self, tmp: Path, needed_bytes: int) -> None:
        """Rank 0 removes stray partial saves, checks the free space and makes ``tmp`` (collective)."""
        failure = None
        if dist.get_rank() == 0:
            try:
                for stale in self.save_dir.glob("iter_*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                self.save_dir.mkdir(parents=True, exist_ok=True)
                free = shutil.disk_usage(self.save_dir).free
                if needed_bytes > free:
                    raise OSError(errno.ENOSPC, f"{needed_bytes / 1e9:.3g} GB needed, {free / 1e9:.3g} GB free")
                tmp.mkdir()
            except Exception as error:
                failure = error
        _agree(failure, tmp.with_suffix(""), tmp)

    def _publish(self, tmp: Path, final: Path, architecture: dict) -> None:
        """Rank 0: name the written checkpoint, point ``latest`` at it, prune; durable at each step."""
        (tmp / CONFIG_FILE).write_text(json.dumps(architecture, indent=2) + "\n")
        fsync_tree(tmp)
        stale = final.with_name(final.name + ".old")
        if final.exists():  # the same iteration saved again: swap, never leave a gap
            os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
        history = [name for name in _history(self.save_dir) if name != final.name] + [final.name]
        _write_durably(self.save_dir / HISTORY, "".join(f"{name}\n" for name in history))
        _write_durably(self.save_dir / LATEST, final.name + "\n")
        self._prune(history)

    def take_finished(self) -> list[SaveReport]:
        finished, self.finished = self.finished, []
        return finished

    def poll(self) -> None:
        """Publish finished asynchronous saves (call once per iteration; collective)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every queued save is published (collective)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def _prune(self, history: list[str]) -> None:
        """Keep the ``keep_last`` checkpoints published last (by this save directory's history,
        not by iteration number: a run resumed from an older iteration saves lower numbers)."""
        if self.keep_last <= 0:
            return
        published = {p.name for p in self.save_dir.iterdir() if iteration_of(p) is not None}
        unrecorded = sorted(published - set(history))  # saved before the history existed: oldest
        by_age = unrecorded + [name for name in history if name in published]
        keep = set(by_age[-self.keep_last:]) | {(self.save_dir / LATEST).read_text().strip()}
        for name in by_age:
            if name not in keep:
                shutil.rmtree(self.save_dir / name, ignore_errors=True)
        _write_durably(self.save_dir / HISTORY, "".join(f"{n}\n" for n in history if n in keep))

    def load(self, load_dir: str, model: ModelChunks, optimizer, scheduler, ema: ShardedEMA | None, data,
             training: TrainingState) -> int:
        """Resume from ``load_dir``'s latest checkpoint; returns its iteration (0 if none)."""
        path = latest_checkpoint(load_dir)
        if path is None:
            return 0
        verify_checkpoint(path)
        common = read_common(path)
        saved_format = common["optimizer"].get("param_state_sharding_type") if self.save_format else None
        if saved_format == "dp_reshardable":
            _check_model_parallel_layout(path, common["run_config"]["parallel"])
        state = _state(model, optimizer, ema, saved_format or self.save_format, loading=True)
        loaded = load_dist_checkpoint(state, path)
        for chunk in model:
            chunk.load_state_dict(to_local_keys(chunk, {k: loaded[k] for k in chunk.sharded_state_dict()}))
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        if ema is not None:
            ema.load_state_dict({k: v for k, v in loaded.items() if k.startswith(EMA_PREFIX)})
        scheduler.load_state_dict(common["scheduler"])
        data.load_state_dict(common["data"])
        training.__dict__.update(common["training"])
        rng = _rng_object()
        if any(key.startswith(rng.key) for key in _saved_object_keys(path)):
            _restore_rng(load_dist_checkpoint({"rng": rng}, path)["rng"])
        return int(common["iteration"])


def _history(save_dir: Path) -> list[str]:
    file = save_dir / HISTORY
    return file.read_text().split() if file.is_file() else []


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` atomically and durably (written, flushed, renamed, folder flushed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _bytes_written_by_all_ranks(state: dict) -> int:
    """Bytes of the tensors that this save writes, summed over ranks (each replica once)."""
    local = sum(sh.data.numel() * sh.data.element_size() for sh in nested_values(state)
                if isinstance(sh, ShardedTensor) and sh.data is not None and is_main_replica(sh.replica_id))
    total = torch.tensor([local], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(total)
    return int(total.item())


def _agree(failure: BaseException | None, final: Path, tmp: Path) -> None:
    """Collective: raise on every rank, with the first failing rank's reason, if any rank failed,
    after removing the partial ``tmp`` (a failed save neither hangs the other ranks nor keeps the
    disk full)."""
    failed = torch.tensor([0 if failure is None else 1], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, None if failure is None else _reason(failure, final))
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(next(reason for reason in reasons if reason)) from None


def _reason(failure: BaseException, final: Path) -> str:
    first_line = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
    if is_disk_full(failure):
        return (f"no space left on {final.parent}: checkpoint {final.name} not saved ({first_line}); "
                f"the partial save was removed")
    return f"checkpoint {final} not saved: {first_line}"


def _check_model_parallel_layout(path: Path, saved: dict) -> None:
    """A ``dp_reshardable`` optimizer state is flat per-rank buffers: it loads at another DP size
    but only at the TP/PP layout it was saved with; say so instead of megatron's shape error."""
    current = {
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_stages": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
    }
    changed = {key: (saved.get(key, 1), size) for key, size in current.items() if saved.get(key, 1) != size}
    if changed:
        what = ", ".join(f"parallel.{key}={was} -> {now}" for key, (was, now) in changed.items())
        raise ConfigError(
            f"checkpoint {path}: its distributed-optimizer state was saved with "
            f"checkpoint.reshardable_optimizer=false (dp_reshardable), which loads only at the same "
            f"tensor/pipeline layout ({what}). Resume at the saved layout, save a checkpoint there with "
            f"checkpoint.reshardable_optimizer=true, then change the layout."
        )


def _saved_object_keys(path: Path) -> set[str]:
    """Keys of everything sharded in a checkpoint (objects appear as ``key/shard_...``)."""
    return set(read_dcp_metadata(path).state_dict_metadata)
