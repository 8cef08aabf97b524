"""Run configuration: nested dataclasses, loaded from YAML with ``section.field=value`` overrides.

One schema serves the command line, YAML files and checkpoints. Every field is checked before
any process group or GPU is touched; an error names the offending field. Parsing imports no
megatron: ``RunConfig.to_model_config()`` builds the megatron config when the run starts.
"""

from megatron_mfm.config.loading import config_to_dict, load_config
from megatron_mfm.config.run import RunConfig
from megatron_mfm.config.sections import (
    FP8_RECIPES,
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

__all__ = [
    "FP8_RECIPES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "ValidationConfig",
    "config_to_dict",
    "load_config",
]
