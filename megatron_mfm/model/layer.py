"""One MfM DiT block: adaLN-modulated self-attention, cross-attention to text, modulated MLP.

    c (B, D) -> adaLN linear -> shift/scale/gate for attention and MLP (fp32)
    x = x + gate_msa * SelfAttn(modulate(LayerNorm(x)))
    x = x + CrossAttn(RMSNorm(x), text)
    x = x + gate_mlp * MLP(modulate(RMSNorm(x)))

Selective recompute of ``mlp`` (``recompute_granularity="selective"``) keeps the MLP's input and
recomputes its norm, modulation and 4x-wide GELU activations in backward. Two options free a
single output that the next linear keeps for its weight gradient, once that linear has run, and
refill it when backward reaches it (megatron's ``CheckpointWithoutOutput``): ``layernorm``
(``recompute_norm_outputs``) the three pre-norm outputs, recomputed from the block's residual
stream (which the norms' backward keeps anyway); ``mlp_act`` (``recompute_mlp_activation``) the
GELU output, recomputed from fc1's output (which GELU's backward keeps anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_mfm.model.attention import RealRows, without_sequence_parallel, xavier_uniform
from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.glue import block_glue
from megatron_mfm.model.norms import RMSNorm
from megatron_mfm.model.packing import PackedAttention, modulation_rows


@dataclass
class MLPSubmodules:
    linear_fc1: ModuleSpec | type
    linear_fc2: ModuleSpec | type


class MLP(MegatronModule):
    """fc1 -> GELU(tanh) -> fc2, column- then row-parallel."""

    def __init__(self, config: MfMConfig, submodules: MLPSubmodules):
        super().__init__(config)
        dim, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1, dim, ffn, config=config, init_method=xavier_uniform(dim, ffn),
            bias=True, gather_output=False, skip_bias_add=False, is_expert=False,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, dim, config=config, init_method=xavier_uniform(ffn, dim),
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        return output_discarded(self, self.config.recompute_mlp_activation, self.config.activation_func, (h,),
                                lambda activation: self.linear_fc2(activation)[0])


def output_discarded(
    module: MegatronModule, selected: bool, function: Callable, args: tuple[torch.Tensor, ...], consumer: Callable
) -> torch.Tensor:
    """``consumer(function(*args))``; when ``selected``, in a training forward in bf16/fp32,
    ``function``'s output is freed once ``consumer`` has run and recomputed from ``args`` when
    backward reaches ``consumer``'s output. Under FP8 the linears keep FP8 copies of their inputs,
    not the inputs, so there is nothing to free."""
    if not (selected and module.training and torch.is_grad_enabled() and module.config.fp8 is None):
        return consumer(function(*args))
    # fp8=None: the recomputed function is elementwise glue, no FP8 GEMM to re-enter.
    checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
    out = consumer(checkpoint.checkpoint(function, *args))
    checkpoint.discard_output_and_register_recompute(out)
    return out


@dataclass
class LayerSubmodules:
    adaln: ModuleSpec | type
    self_attention: ModuleSpec
    cross_attention: ModuleSpec
    mlp: ModuleSpec


class TransformerLayer(MegatronModule):
    """The MfM block; ``layer_number`` is 1-based and global (across pipeline stages)."""

    def __init__(self, config: MfMConfig, submodules: LayerSubmodules, layer_number: int = 1):
        super().__init__(config)
        self.layer_number = layer_number
        dim = config.hidden_size
        # Column-parallel with the output gathered: every rank needs all 6*D modulation values.
        self.adaln = build_module(
            submodules.adaln, dim, 6 * dim, config=without_sequence_parallel(config),
            init_method=torch.nn.init.zeros_, bias=True, gather_output=True,
        )
        self.self_attention = build_module(submodules.self_attention, config=config)
        self.cross_norm = RMSNorm(config, dim)
        self.cross_attention = build_module(submodules.cross_attention, config=config)
        self.mlp_norm = RMSNorm(config, dim)
        self.mlp = build_module(submodules.mlp, config=config)
        self.glue = block_glue(config.compile_glue)

    def modulation(self, c: torch.Tensor, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Six (1, B, D) fp32 tensors: shift/scale/gate for attention, then for the MLP; for a
        packed sequence (``rows``: each token's sample) six per-token (S, 1, D) tensors."""
        emb, _ = self.adaln(F.silu(c))
        if self.config.sequence_parallel:
            # Each rank modulates only its tokens, so gradients must be summed over TP ranks.
            emb = copy_to_tensor_model_parallel_region(emb)
        if rows is not None:
            return modulation_rows(rows, emb.float()).chunk(6, dim=-1)
        return [m[None] for m in emb.float().chunk(6, dim=-1)]

    def _normed_into(self, consumer: Callable, norm: Callable, *args: torch.Tensor) -> torch.Tensor:
        """``consumer(norm(*args))``, the norm's output freed after use under ``layernorm``."""
        return output_discarded(self, self.config.recompute_norm_outputs, norm, args, consumer)

    def _mlp_recomputed(self) -> bool:
        """Block-selective ``mlp`` recompute: the MLP's input kept, the rest recomputed."""
        selected = self.config.recompute_granularity == "selective" and "mlp" in self.config.recompute_modules
        return selected and self.training

    def _attention_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.glue.layer_norm_modulate(x, shift, scale)

    def _cross_attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.glue.rms_norm(x, self.cross_norm.weight, self.cross_norm.eps)

    def _mlp_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.glue.rms_norm_modulate(x, self.mlp_norm.weight, self.mlp_norm.eps, shift, scale)

    def _modulated_mlp(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self._normed_into(self.mlp, self._mlp_input, x, shift, scale)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        token_mask: torch.Tensor | None = None,
        packed: PackedAttention | None = None,
        real_rows: RealRows = RealRows(),
    ) -> torch.Tensor:
        """x (S/cp/sp, B, D), c (B, D), text (L, B, C_text), text_mask (B, L) True = keep,
        token_mask (B, S) True for real video tokens when the sequence is padded; ``real_rows``:
        how many of a clip's padded rows are real; ``packed``: a packed sequence's segments (B =
        1, c (samples, D), both masks None)."""
        if packed is not None:
            token_mask, text_mask = packed.self_attention, packed.cross_attention
        rows = None if packed is None else packed.modulation_index
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c, rows)
        attention = self._normed_into(lambda attn_in: self.self_attention(attn_in, rope, token_mask, real_rows.tokens),
                                      self._attention_input, x, shift_msa, scale_msa)
        x = self.glue.gated_residual(x, gate_msa, attention)
        x = x + self._normed_into(
            lambda cross_in: self.cross_attention(cross_in, text, text_mask, rope, real_rows.text),
            self._cross_attention_input, x)
        if self._mlp_recomputed():
            mlp = tensor_parallel.checkpoint(self._modulated_mlp, False, x, shift_mlp, scale_mlp)
        else:
            mlp = self._modulated_mlp(x, shift_mlp, scale_mlp)
        return self.glue.gated_residual(x, gate_mlp, mlp)
