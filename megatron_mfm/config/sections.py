"""The sections of the run configuration (``model.*``, ``parallel.*``, ``train.*``...): one
dataclass each, a docstring under every field, pure checks in ``__post_init__`` (no I/O, no
megatron), errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_mfm.data.packing import PackingConfig
from megatron_mfm.data.shards.stages import StageConfig
from megatron_mfm.data.shards.streaming import ShardDataConfig
from megatron_mfm.data.synthetic import SyntheticConfig
from megatron_mfm.model.presets import (
    ATTENTION_BACKENDS, CONTEXT_PARALLEL_COMM, OUTPUT_RECOMPUTE_MODULES, PRESETS, SELECTIVE_RECOMPUTE_MODULES, TUNED_GLUE,
)


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}
"""``train.fp8_recipe`` -> megatron's ``Fp8Recipe`` (current scaling is its "tensorwise")."""

GRADIENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``optimizer.grad_dtype`` -> the dtype of megatron's gradient buffers."""

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``optimizer.moments_dtype`` -> the dtype of Adam's moments (fp16 is scaled per tensor)."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """tiny, small, base, mfm-2b or mfm-8b (``model/presets.py``)."""
    num_layers: int = 0
    """Blocks of the model (0: the preset's); fewer for a reduced-depth run of a large preset."""
    backend: str = "auto"
    """Layer spec: auto (TE on GPU when installed), te or local."""
    recompute: bool | str = False
    """Recompute each block's activations in backward (full activation checkpointing); auto:
    recompute the fewest blocks that fit the GPU's memory, measured on the first steps
    (``model/recompute_budget.py``; GPU, pipeline_parallel=1)."""
    recompute_num_layers: int = 0
    """With ``recompute``: recompute only the first N blocks of each pipeline stage (megatron's
    "block" method) and keep the others' activations, to spend spare memory on speed; 0: all."""
    recompute_modules: list[str] = field(default_factory=list)
    """Selective recompute: mlp (norm, modulation and the 4x-wide MLP activations) is block
    selective, so it needs ``recompute`` false; layernorm (the outputs of the three pre-norms and
    their modulation, freed once their linear has run) and mlp_act (the MLP's GELU output; fc1's
    output stays kept) each recompute one elementwise pass and combine with any ``recompute``;
    both are no-ops under FP8, whose linears keep FP8 copies of their inputs instead."""
    attention_backend: str = "auto"
    """Core attention (``model/attention_backends``): auto (FlashAttention-4 where it runs, else
    cuDNN; the CPU keeps torch's SDPA), fa4, cudnn or sdpa (SDPA timed fastest per shape)."""
    compile_glue: bool | str = False
    """Fuse each block's fp32 glue (norms, modulation, QK-norm + RoPE, gated residuals) with
    torch.compile (``model/glue.py``): fewer kernels, and only 16-bit activations kept for
    backward. The first steps of each new clip shape pay the compilation. tuned: also tune each
    kernel's launch on the GPU (about a minute more compilation per shape; MfM-2B's step 0.7%
    faster on an H200)."""
    cuda_graphs: bool = False
    """Replay each training step's forward and backward from CUDA graphs, captured on the first
    step of each clip shape (``model/cuda_graphs.py``), for small clips, where launching the
    kernels takes longer than running them. GPU; torch-native layers (``backend: local``);
    tensor, pipeline and context parallel 1; no block recompute; no packing. Each clip shape
    keeps its own activation memory. ``attention_backend`` auto or sdpa: SDPA's flash or
    memory-efficient kernels, never cuDNN's fused attention, which died under capture with an
    illegal memory access on an H200 (docs/PERFORMANCE.md, session 13)."""

    def recompute_options(self) -> dict:
        """megatron TransformerConfig fields for full, selective, no or measured (auto) activation
        recompute, and whether the MLP's activation is recomputed on its own."""
        return dict(**self._block_recompute_options(),
                    recompute_norm_outputs="layernorm" in self.recompute_modules,
                    recompute_mlp_activation="mlp_act" in self.recompute_modules)

    @property
    def _selective_modules(self) -> list[str]:
        return [name for name in self.recompute_modules if name not in OUTPUT_RECOMPUTE_MODULES]

    def _block_recompute_options(self) -> dict:
        """Full, selective, none or auto (which starts from every block recomputed)."""
        if self.recompute == "auto":
            return dict(recompute_granularity="full", recompute_method="block", recompute_auto=True,
                        recompute_num_layers=self.num_layers or PRESETS[self.preset]["num_layers"])
        if self.recompute and self.recompute_num_layers:
            return dict(recompute_granularity="full", recompute_method="block",
                        recompute_num_layers=self.recompute_num_layers)
        if self.recompute:
            return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if self._selective_modules:
            return dict(recompute_granularity="selective", recompute_modules=self._selective_modules)
        return dict(recompute_granularity=None)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r}: choose one of {sorted(PRESETS)}")
        if self.num_layers < 0:
            raise ConfigError(f"model.num_layers={self.num_layers} must be >= 0 (0: the preset's)")
        if self.backend not in ("auto", "te", "local"):
            raise ConfigError(f"model.backend={self.backend!r}: choose auto, te or local")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r}: choose one of {ATTENTION_BACKENDS}")
        if self.compile_glue not in (True, False, TUNED_GLUE):
            raise ConfigError(f"model.compile_glue={self.compile_glue!r}: choose true, false or {TUNED_GLUE}")
        if self.recompute not in (True, False, "auto"):
            raise ConfigError(f"model.recompute={self.recompute!r}: choose true, false or auto")
        unknown = sorted(set(self.recompute_modules) - set(SELECTIVE_RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(f"model.recompute_modules: unknown {unknown}; choose from {SELECTIVE_RECOMPUTE_MODULES}")
        if self.recompute and self._selective_modules:
            raise ConfigError(f"model.recompute_modules: {self._selective_modules} need model.recompute=false (they are "
                              f"block-selective recompute; only {list(OUTPUT_RECOMPUTE_MODULES)} combine with full or auto)")
        if self.recompute_num_layers < 0 or (self.recompute_num_layers and self.recompute is not True):
            raise ConfigError(
                f"model.recompute_num_layers={self.recompute_num_layers}: needs model.recompute=true and >= 0 (0: all)"
            )


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    """Pipeline stages (the layers split evenly; 1F1B schedule)."""
    context_parallel: int = 1
    """Split each clip's tokens across CP ranks (attention still spans the full sequence)."""
    context_parallel_comm: str = "a2a"
    """How CP attention exchanges data: a2a (all-to-all swaps the token split for a head split;
    needs heads % (tp * cp) == 0) or p2p (ring attention: key/value chunks travel around the CP
    ranks; needs only heads % tp == 0)."""
    sequence_parallel: bool = False
    """Split tokens across TP ranks outside attention/MLP GEMMs (needs tensor_parallel > 1)."""
    virtual_pipeline_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B: a smaller pipeline bubble for more
    point-to-point traffic); > 1 needs pipeline_parallel >= 3."""
    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron DistributedOptimizer)."""
    overlap_grad_reduce: bool = True
    """Reduce each gradient bucket across data-parallel ranks as soon as backward fills it, under
    the rest of backward (megatron DDP); false reduces everything after backward."""

    def __post_init__(self) -> None:
        if min(self.tensor_parallel, self.pipeline_parallel, self.context_parallel) < 1:
            raise ConfigError("parallel.tensor_parallel, pipeline_parallel and context_parallel must be >= 1")
        if self.virtual_pipeline_stages < 1:
            raise ConfigError(f"parallel.virtual_pipeline_stages={self.virtual_pipeline_stages} must be >= 1")
        if self.virtual_pipeline_stages > 1 and self.pipeline_parallel < 3:
            # With two stages the previous and the next rank are the same peer, and megatron's
            # interleaved p2p (batched or not) then swaps activations and gradients (measured on
            # gloo: zero inputs, gradients where there must be none) or aborts on shape messages.
            raise ConfigError(
                f"parallel.virtual_pipeline_stages={self.virtual_pipeline_stages} needs parallel.pipeline_parallel >= 3 "
                f"(got {self.pipeline_parallel})"
            )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.context_parallel_comm not in CONTEXT_PARALLEL_COMM:
            raise ConfigError(
                f"parallel.context_parallel_comm={self.context_parallel_comm!r}: choose one of {CONTEXT_PARALLEL_COMM}"
            )


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_iterations: int = 0
    decay_style: str = "constant"
    """constant or cosine (from lr to min_lr over the iterations after warm-up)."""
    grad_dtype: str = "fp32"
    """Gradient buffers (accumulated over micro-batches, reduced over data-parallel ranks): fp32,
    or bf16 (half their memory, as the official bf16 mode; needs train.precision=bf16 or fp8)."""
    moments_dtype: str = "fp32"
    """Adam's moments: fp32, or bf16 / fp16 (scaled per tensor): half their memory, through
    megatron's precision-aware optimizer (Transformer Engine's FusedAdam on a GPU; needs
    parallel.distributed_optimizer=true, one GPU is fine, and train.precision=bf16 or fp8). It also
    keeps the fp32 master weights as the 16 bits the bf16 weights lack: the same values, half the
    memory."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optimizer.lr={self.lr} / min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if self.decay_style not in ("constant", "cosine"):
            raise ConfigError(f"optimizer.decay_style={self.decay_style!r}: choose constant or cosine")
        if self.warmup_iterations < 0:
            raise ConfigError("optimizer.warmup_iterations must be >= 0")
        if self.grad_dtype not in GRADIENT_DTYPES:
            raise ConfigError(f"optimizer.grad_dtype={self.grad_dtype!r}: choose one of {sorted(GRADIENT_DTYPES)}")
        if self.moments_dtype not in MOMENT_DTYPES:
            raise ConfigError(f"optimizer.moments_dtype={self.moments_dtype!r}: choose one of {sorted(MOMENT_DTYPES)}")

    def check_precision(self, precision: str, distributed_optimizer: bool) -> None:
        """16-bit gradients or moments only beside 16-bit weights; 16-bit moments only in the
        distributed optimizer (the one megatron's precision-aware optimizer extends)."""
        sixteen_bit = [f"optimizer.{name}={getattr(self, name)}" for name in ("grad_dtype", "moments_dtype")
                       if getattr(self, name) != "fp32"]
        if sixteen_bit and precision == "fp32":
            raise ConfigError(f"{sixteen_bit[0]} needs train.precision=bf16 or fp8 (fp32 weights keep an fp32 "
                              "optimizer state)")
        if self.moments_dtype != "fp32" and not distributed_optimizer:
            raise ConfigError(f"optimizer.moments_dtype={self.moments_dtype} needs parallel.distributed_optimizer=true "
                              "(megatron's precision-aware optimizer; one GPU is fine)")


@dataclass
class TrainConfig:
    iterations: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks and micro-batches."""
    seed: int = 1234
    precision: str = "fp32"
    """fp32, bf16 (fp32 master weights in the optimizer) or fp8 (bf16 plus Transformer Engine
    FP8 GEMMs in the blocks; GPU only)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling with ``precision=fp8``: delayed (amax history) or current (per-tensor, per step)."""
    ema_decay: float = 0.999
    """EMA of the weights (0 disables); warmed up over the first steps (``training/ema.py``)."""
    stop_iteration: int = 0
    """Stop (and save) once this iteration is done, keeping the LR schedule of ``iterations``
    (for job time limits); 0 runs to ``iterations``."""
    max_skipped_steps: int = 10
    """Stop after this many steps skipped for non-finite loss or gradients."""

    def precision_options(self) -> dict:
        """megatron TransformerConfig fields for fp32, bf16 or bf16 + FP8 GEMMs."""
        bf16 = self.precision in ("bf16", "fp8")
        dtype = torch.bfloat16 if bf16 else torch.float32
        options = dict(bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)
        if self.precision == "fp8":
            # E4M3 forward, E5M2 gradients; delayed scaling over a 1024-step amax history (max)
            options.update(fp8="hybrid", fp8_recipe=FP8_RECIPES[self.fp8_recipe], fp8_amax_history_len=1024,
                           fp8_amax_compute_algo="max")
        return options

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("train.iterations, micro_batch_size and global_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ConfigError(f"train.precision={self.precision!r}: choose fp32, bf16 or fp8")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"train.fp8_recipe={self.fp8_recipe!r}: choose one of {sorted(FP8_RECIPES)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be within [0, 1)")


@dataclass
class CheckpointConfig:
    save: str = ""
    """Directory for iter_XXXXXXX checkpoints ('' disables saving)."""
    load: str = ""
    """Directory to resume from (its 'latest'); '' starts fresh."""
    interval: int = 0
    """Save every N iterations (0: only at the end and on SIGTERM)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted once a newer one is complete); 0 keeps all."""
    async_save: bool = False
    """Write checkpoint files in the background while training continues."""
    reshardable_optimizer: bool = True
    """With parallel.distributed_optimizer: save optimizer state per parameter (gathered over DP
    on save) so the checkpoint resumes at any TP/PP/DP layout; false writes each rank's flat
    shard in parallel (faster for large runs; resumes only at the same TP/PP, any DP)."""


@dataclass
class LoggingConfig:
    interval: int = 1
    """Iterations between log lines."""
    tensorboard_dir: str = ""
    metrics_file: str = ""
    """JSON lines of every logged iteration's metrics ('' disables)."""
    wandb_project: str = ""
    """'' disables wandb; runs are offline unless wandb_mode is online."""
    wandb_mode: str = "offline"
    sample_interval: int = 0
    """Sample validation clips every N iterations (0: never)."""
    sample_dir: str = ""
    sample_steps: int = 10
    guidance_scale: float = 5.0
    sample_schedule: str = "official"
    """Sigma schedule of validation samples: official (MfM time warp) or shifted."""
    sample_shift: float = 3.0
    """Shift of the ``shifted`` schedule (match the training shift of small runs)."""
    peak_tflops: float = 0.0
    """Per-GPU dense bf16 peak for MFU (0: this GPU's from ``training/flops.py``; no MFU on CPU)."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: profile these iterations (torch profiler traces, and CUDA profiler
    start/stop for ``nsys profile --capture-range=cudaProfilerApi``); [] never profiles."""
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks that profile during ``profile_steps``."""
    profile_dir: str = ""
    """Where the torch profiler traces go (rank<N>.json; '' : <checkpoint.save or .>/profile)."""

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"logging.interval={self.interval} must be >= 1")
        steps = self.profile_steps
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ConfigError(f"logging.profile_steps={steps}: expected [first, last] iterations, 1 <= first <= last")
        if any(rank < 0 for rank in self.profile_ranks):
            raise ConfigError(f"logging.profile_ranks={self.profile_ranks}: ranks must be >= 0")


@dataclass
class ValidationConfig:
    """Held-out validation loss: the same samples, noise and sigmas at every evaluation."""

    interval: int = 0
    """Evaluate every N iterations (0: never)."""
    num_samples: int = 16
    """Held-out samples (a multiple of train.micro_batch_size x the data-parallel size)."""
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """Noise levels every sample is evaluated at (logged as val/loss/sigma_<s>)."""
    seed: int = 1
    """Seed of the held-out synthetic scenes, their tasks and noise (must differ from
    data.synthetic.seed, so no held-out scene is a training scene)."""
    shards_path: str = ""
    """Held-out shards (data_prep/make_shards.py output; needed with data.source=shards);
    read with data.shards' other settings and data.stages' first stage."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"validation.interval={self.interval} must be >= 0 (0: never)")
        if self.num_samples < 1:
            raise ConfigError(f"validation.num_samples={self.num_samples} must be >= 1")
        if not self.sigmas or any(not 0.0 < s <= 1.0 for s in self.sigmas):
            raise ConfigError(f"validation.sigmas={self.sigmas}: need at least one, each within (0, 1]")


def _single_stage() -> list[StageConfig]:
    return [StageConfig()]


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic (built in, no files) or shards (data_prep/make_shards.py output at data.shards.path)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shards: ShardDataConfig = field(default_factory=ShardDataConfig)
    stages: list[StageConfig] = field(default_factory=_single_stage)
    """Shards only: the resolution-progressive schedule (buckets, frames, token budget, tasks)."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """Packed variable-length micro-batches (off by default: bucketed by shape)."""

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "shards"):
            raise ConfigError(f"data.source={self.source!r}: choose synthetic or shards")
