"""The MfM DiT: config, layers, specs and the model."""

from megatron_mfm.model.config import MfMConfig, from_official_config, preset_config
from megatron_mfm.model.dit import MfMDiT, build_model
from megatron_mfm.model.specs import default_layer_spec, local_layer_spec, te_layer_spec

__all__ = [
    "MfMConfig",
    "MfMDiT",
    "build_model",
    "default_layer_spec",
    "from_official_config",
    "local_layer_spec",
    "preset_config",
    "te_layer_spec",
]
