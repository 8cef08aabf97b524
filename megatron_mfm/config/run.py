"""``RunConfig``: the whole run's configuration, the checks that need the disk or the world size,
and the megatron model configuration it builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_mfm.config.sections import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    ValidationConfig,
)
from megatron_mfm.data.shards.catalog import INDEX
from megatron_mfm.diffusion.flow_matching import FlowMatchingConfig
from megatron_mfm.encoders.interface import EncoderConfig
from megatron_mfm.model.presets import PRESETS
from megatron_mfm.tasks.mixture import TaskMixtureConfig

if TYPE_CHECKING:
    from megatron_mfm.model.config import MfMConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TaskMixtureConfig = field(default_factory=TaskMixtureConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    """Frozen VAE / T5 / depth model: built-in stand-ins or pretrained weights from local folders."""

    def __post_init__(self) -> None:
        self.optimizer.check_precision(self.train.precision, self.parallel.distributed_optimizer)
        self._check_cuda_graphs()

    def _check_cuda_graphs(self) -> None:
        """What a captured step cannot hold (``model/cuda_graphs.py``)."""
        if not self.model.cuda_graphs:
            return
        parallel, model = self.parallel, self.model
        unsupported = {
            "model.backend must be local (Transformer Engine's modules are not tested under capture)":
                model.backend != "local",
            "parallel.tensor_parallel, pipeline_parallel and context_parallel must be 1 (no collectives inside "
            "a graph)": max(parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel) > 1,
            "model.recompute must be false and model.recompute_modules hold only layernorm and mlp_act (block "
            "recompute restores random states)": bool(model.recompute) or bool(model.recompute_options().get(
                "recompute_modules")),
            "train.precision must not be fp8": self.train.precision == "fp8",
            "model.attention_backend must be auto or sdpa (fa4's masked attention and cudnn run cuDNN's fused "
            "attention, which died under capture with an illegal memory access on an H200)":
                model.attention_backend in ("fa4", "cudnn"),
            "data.packing.token_budget must be 0 (each packed micro-batch has its own shape)":
                self.data.packing.token_budget > 0,
        }
        reasons = [reason for reason, present in unsupported.items() if present]
        if reasons:
            raise ConfigError(f"model.cuda_graphs=true: {'; '.join(reasons)}")

    def to_model_config(self) -> MfMConfig:
        """The megatron ``TransformerConfig`` of this run: preset, depth, parallel layout,
        precision and recompute, in megatron's field names."""
        from megatron_mfm.model.config import preset_config  # megatron loads here, not when a YAML parses

        depth = {"num_layers": self.model.num_layers} if self.model.num_layers else {}
        virtual = self.parallel.virtual_pipeline_stages
        return preset_config(
            self.model.preset,
            **depth,
            virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
            tensor_model_parallel_size=self.parallel.tensor_parallel,
            pipeline_model_parallel_size=self.parallel.pipeline_parallel,
            context_parallel_size=self.parallel.context_parallel,
            cp_comm_type=self.parallel.context_parallel_comm,
            variable_seq_lengths=self.parallel.pipeline_parallel > 1,  # image and video micro-batches
            moe_token_dispatcher_type="alltoall",  # no MoE here; megatron's check for variable lengths
            init_seed=self.train.seed,
            compile_glue=self.model.compile_glue,
            cuda_graphs=self.model.cuda_graphs,
            sequence_parallel=self.parallel.sequence_parallel,
            **self.train.precision_options(),
            **self.model.recompute_options(),
        )

    def check_files(self) -> None:
        """Checks that read the disk: the inputs the run names exist."""
        if self.data.source == "shards" and not (Path(self.data.shards.path) / INDEX).is_file():
            raise ConfigError(f"data.shards.path={self.data.shards.path!r}: no {INDEX} there (run data_prep/make_shards.py)")
        held_out = self.validation.shards_path
        if held_out and not (Path(held_out) / INDEX).is_file():
            raise ConfigError(f"validation.shards_path={held_out!r}: no {INDEX} there (run data_prep/make_shards.py)")

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of processes."""
        tp, pp, cp = self.parallel.tensor_parallel, self.parallel.pipeline_parallel, self.parallel.context_parallel
        if world_size % (tp * pp * cp):
            raise ConfigError(
                f"parallel.tensor_parallel={tp} x pipeline_parallel={pp} x context_parallel={cp} does not divide "
                f"the world size {world_size}"
            )
        layers = self.model.num_layers or PRESETS[self.model.preset]["num_layers"]
        chunks = pp * self.parallel.virtual_pipeline_stages
        if layers % chunks:
            raise ConfigError(
                f"parallel.pipeline_parallel={pp} x virtual_pipeline_stages={self.parallel.virtual_pipeline_stages} "
                f"does not divide the {layers} layers of {self.model.preset}"
            )
        micro_batches = self.train.global_batch_size // self.train.micro_batch_size
        if self.parallel.virtual_pipeline_stages > 1 and (micro_batches // max(1, world_size // (tp * pp * cp))) % pp:
            raise ConfigError(
                f"parallel.virtual_pipeline_stages > 1: the micro-batches per step and DP rank must be a multiple of "
                f"parallel.pipeline_parallel={pp} (megatron's interleaved schedule)"
            )
        if self.train.precision == "fp8" and self.model.backend == "local":
            raise ConfigError("train.precision=fp8 needs the Transformer Engine layers: model.backend=te (or auto)")
        if self.model.recompute == "auto" and pp > 1:
            raise ConfigError("model.recompute=auto needs parallel.pipeline_parallel=1 (micro-batches in flight are not "
                              "modelled); set model.recompute_num_layers by hand")
        dp = world_size // (tp * pp * cp)
        self._check_validation(dp)
        if self.train.global_batch_size % (self.train.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"micro_batch_size * data-parallel size = {self.train.micro_batch_size} * {dp}"
            )
        heads = PRESETS[self.model.preset]["num_attention_heads"]
        if self.parallel.context_parallel_comm == "p2p" and heads % tp:
            raise ConfigError(
                f"parallel.tensor_parallel={tp} does not divide the {heads} heads of {self.model.preset}"
            )
        if self.parallel.context_parallel_comm == "a2a" and heads % (tp * cp):
            raise ConfigError(
                f"parallel.tensor_parallel x context_parallel = {tp * cp} does not divide the {heads} heads of "
                f"{self.model.preset} (all-to-all context parallelism splits heads; "
                "parallel.context_parallel_comm=p2p does not)"
            )


    def _check_validation(self, dp: int) -> None:
        validation, mbs = self.validation, self.train.micro_batch_size
        if not validation.interval:
            return
        if validation.num_samples % (mbs * dp):
            raise ConfigError(
                f"validation.num_samples={validation.num_samples} is not a multiple of "
                f"micro_batch_size * data-parallel size = {mbs} * {dp}"
            )
        if self.data.source == "shards" and not validation.shards_path:
            raise ConfigError("validation.shards_path: held-out shards are needed with data.source=shards")
        if not validation.shards_path and validation.seed == self.data.synthetic.seed:
            raise ConfigError(f"validation.seed={validation.seed} equals data.synthetic.seed: the held-out scenes "
                              "would be training scenes")
