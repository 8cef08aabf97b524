"""The MfM DiT configuration: a megatron ``TransformerConfig`` plus the DiT's own fields.

Presets are in ``presets.py``; ``from_official_config`` reads the official
``transformer/config.json`` and refuses settings the official inference model never uses.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_mfm.model.geometry import LATENT_CHANNELS, PATCH_SIZE
from megatron_mfm.model.presets import CONTEXT_PARALLEL_COMM, PRESETS

gelu_tanh = functools.partial(F.gelu, approximate="tanh")

# Channels of the official pixel-space condition adapter (hard-coded in the official model).
ADAPTER_CHANNELS = (16, 32, 96, 256, 512)


@dataclass
class MfMConfig(TransformerConfig):
    """Megatron TransformerConfig extended with what the MfM DiT needs."""

    in_channels: int = LATENT_CHANNELS
    """Latent channels of the CogVideoX VAE."""

    out_channels: int = LATENT_CHANNELS
    """Channels the head predicts (the velocity has as many as the latent)."""

    patch_size: int = PATCH_SIZE
    """Spatial patch size; the temporal patch size is 1 (one latent frame per token row)."""

    text_hidden_size: int = 4096
    """Width of the frozen text encoder output (the official ``cross_attention_dim``)."""

    attention_bias: bool = False
    """Biases on the q/k/v/o projections of both attentions (official ``attention_bias``)."""

    use_depth_condition: bool = True
    """Condition adapter takes 5 channels (RGB*mask, depth, mask) instead of 4 (no depth)."""

    use_motion_score: bool = True
    """Add the motion-score embedding to the timestep embedding."""

    rope_theta: float = 10000.0
    """Base of the 3D rotary embedding."""

    sample_size: int = 64
    """Official ``sample_size``; unused by the math, written back on export."""

    init_seed: int = 0
    """Seed of the (CPU) weight initialisation; each layer draws from its own stream."""

    compile_glue: bool | str = False
    """Fuse the block's fp32 glue (norms, modulation, QK-norm + RoPE, gated residuals) with
    ``torch.compile`` (``model/glue.py``): fewer kernels and far less activation memory; "tuned":
    and tune each kernel's launch (``presets.TUNED_GLUE``)."""

    cuda_graphs: bool = False
    """Replay the training forward and backward from CUDA graphs captured per input shape
    (``model/cuda_graphs.py``): a step whose kernels are smaller than their launches."""

    recompute_auto: bool = False
    """Pick the number of recomputed blocks from measured memory (``model/recompute_budget.py``);
    needs recompute_granularity="full" with the "block" method, which it then overrides."""

    recompute_norm_outputs: bool = False
    """Free the outputs of the block's three pre-norms (with their modulation) once the linear that
    reads them has run, and recompute them when backward reaches it (``model.recompute_modules:
    [layernorm]``, megatron's meaning); combines with any other recompute."""

    recompute_mlp_activation: bool = False
    """Free the MLP's GELU output after fc2's forward and recompute it from fc1's output in
    backward (``model.recompute_modules: [mlp_act]``); combines with any other recompute."""

    cp_comm_type: str = "a2a"
    """Megatron's field, narrowed to the context-parallel attentions we implement: "a2a"
    (all-to-all head exchange) or "p2p" (ring attention, ``parallel/ring_attention.py``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        head_dim = self.kv_channels
        if head_dim % 8 != 0 or (head_dim // 8 * 3) % 2 != 0:
            raise ValueError(
                f"MfMConfig.kv_channels={head_dim}: 3D RoPE splits the head into D/4, 3D/8, 3D/8 "
                "rotary pairs, so the head dim must be a multiple of 16"
            )
        if self.cp_comm_type not in CONTEXT_PARALLEL_COMM:
            raise ValueError(
                f"MfMConfig.cp_comm_type={self.cp_comm_type!r}: choose one of {CONTEXT_PARALLEL_COMM} "
                "(a2a: all-to-all head exchange; p2p: ring attention)"
            )
        if self.hidden_size != self.num_attention_heads * head_dim:
            raise ValueError(
                f"MfMConfig.hidden_size={self.hidden_size} must equal num_attention_heads * "
                f"kv_channels = {self.num_attention_heads} * {head_dim}"
            )

    @property
    def condition_channels(self) -> int:
        """Pixel channels of the adapter input: RGB (+ depth) + mask."""
        return 5 if self.use_depth_condition else 4


# Megatron settings every MfM model shares: bidirectional attention, no dropout, no fusions that
# need apex/TE, fp32 adaLN math, GELU(tanh) MLP.
_COMMON: dict[str, Any] = dict(
    layernorm_epsilon=1e-6,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    add_bias_linear=True,
    gated_linear_unit=False,
    activation_func=gelu_tanh,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)


def make_config(**fields: Any) -> MfMConfig:
    """Build an MfMConfig with the MfM defaults (4x MLP, head dim from hidden/heads)."""
    values = dict(_COMMON)
    values.update(fields)
    values.setdefault("kv_channels", values["hidden_size"] // values["num_attention_heads"])
    values.setdefault("ffn_hidden_size", 4 * values["hidden_size"])
    values.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    values.setdefault("pipeline_dtype", values.get("params_dtype", torch.float32))  # p2p dtype under PP
    return MfMConfig(**values)


def preset_config(name: str, **overrides: Any) -> MfMConfig:
    """One of ``tiny``, ``small``, ``mfm-2b``, ``mfm-8b``, with megatron overrides (parallelism, dtype...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return make_config(**{**PRESETS[name], **overrides})


# Official config.json values we can represent; anything else is refused with its key named.
_OFFICIAL_REQUIRED = {
    "use_rope": True,
    "condition_type": "inpaint_mask",
    "activation_fn": "gelu-approximate",
}
_OFFICIAL_ALLOWED = {
    "norm_type": {"ada_norm_zero", "ada_norm_zero_nolabel"},
    "adaln_norm_type": {"legacy", "layernorm"},
    "num_block_chunks": {1, None},
    "patch_size_t": {1, None},
    "use_navit": {False, None},
}


def from_official_config(official: dict[str, Any], **overrides: Any) -> MfMConfig:
    """Config from the official ``transformer/config.json`` (a parsed dict)."""
    for key, value in _OFFICIAL_REQUIRED.items():
        if official.get(key) != value:
            raise ValueError(
                f"official config: {key}={official.get(key)!r} is not supported (need {value!r})"
            )
    for key, allowed in _OFFICIAL_ALLOWED.items():
        if official.get(key) not in allowed:
            raise ValueError(
                f"official config: {key}={official.get(key)!r} is not supported "
                f"(supported: {sorted(map(str, allowed))})"
            )
    text_dim = official["cross_attention_dim"]
    if isinstance(text_dim, list):
        if len(set(text_dim)) != 1:
            raise ValueError(
                f"official config: cross_attention_dim={text_dim} alternates text encoders; "
                "only one text encoder is supported"
            )
        text_dim = text_dim[0]
    heads, head_dim = official["num_attention_heads"], official["attention_head_dim"]
    in_channels = official["in_channels"]
    fields = dict(
        num_layers=official["num_layers"],
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        kv_channels=head_dim,
        in_channels=in_channels,
        out_channels=official.get("out_channels") or in_channels,
        patch_size=official.get("patch_size", 2),
        text_hidden_size=text_dim,
        attention_bias=bool(official.get("attention_bias", False)),
        use_depth_condition=bool(official.get("use_depth_cond", False)),
        use_motion_score=bool(official.get("add_motion_score", False)),
        sample_size=official.get("sample_size", 64),
    )
    fields.update(overrides)
    return make_config(**fields)


def to_official_config(config: MfMConfig) -> dict[str, Any]:
    """The official ``transformer/config.json`` describing ``config``."""
    return {
        "_class_name": "Transformer3DModel",
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.kv_channels,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.num_layers,
        "cross_attention_dim": config.text_hidden_size,
        "attention_bias": config.attention_bias,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "patch_size_t": 1,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero_nolabel",
        "adaln_norm_type": "legacy",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "use_rope": True,
        "add_motion_score": config.use_motion_score,
        "condition_type": "inpaint_mask",
        "use_depth_cond": config.use_depth_condition,
        "num_block_chunks": 1,
        "sequence_parallel_size": 0,
        "dropout": 0.0,
    }


# Fields of MfMConfig that define the architecture; saved with checkpoints to rebuild the model.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_channels",
    "ffn_hidden_size",
    "in_channels",
    "out_channels",
    "patch_size",
    "text_hidden_size",
    "attention_bias",
    "use_depth_condition",
    "use_motion_score",
    "rope_theta",
    "sample_size",
)


def architecture_of(config: MfMConfig) -> dict[str, Any]:
    """The architecture fields of ``config`` as a JSON-able dict."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in ARCHITECTURE_FIELDS}
