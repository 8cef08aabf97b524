"""The MfM diffusion transformer as a megatron ``MegatronModule``.

    latents (B, C, T, H, W) --patchify--> (B, D, T, H/2, W/2) + adapter(condition pixels)
    --flatten t,h,w--> tokens (S, B, D) [split over TP ranks under SP]
    --N x TransformerLayer(c = t-embed + motion-embed, text, 3D RoPE)-->
    --adaLN head--> (S, B, 2*2*C) --unpatchify--> velocity (B, C, T, H, W)

Pipeline stages: ``pre_process`` owns the patch embedding, the adapter and the timestep/motion
embedders, ``post_process`` the head. The conditioning ``c`` (B, D) travels between stages as one
extra row appended to the activations ((S/sp + 1, B, D)), so its gradient from every stage's
layers flows back through the pipeline to the one embedder that made it.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import make_viewless_tensor

from megatron_mfm.model.attention import RealRows
from megatron_mfm.model.config import MfMConfig
from megatron_mfm.model.cuda_graphs import CapturedSteps
from megatron_mfm.model.geometry import pixel_shape
from megatron_mfm.model.embeddings import ConditionAdapter, PatchEmbed, TimestepMLP
from megatron_mfm.model.glue import block_glue
from megatron_mfm.model.packing import PackedAttention, PackedSequence, Segments, modulation_rows, pack_text
from megatron_mfm.model.recompute_budget import AutoRecompute
from megatron_mfm.model.rope import rope_cos_sin
from megatron_mfm.parallel.context import TokenLayout, gather_tokens, pad_rope, scatter_tokens, token_layout


class MfMDiT(MegatronModule):
    """Many-for-Many video DiT (official ``Transformer3DModel`` numerics) on megatron-core."""

    model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
    share_embeddings_and_output_weights = False  # read by megatron's finalize_model_grads (LM weight tying)

    def __init__(
        self,
        config: MfMConfig,
        layer_spec: ModuleSpec,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config)
        self.vp_stage = vp_stage  # this chunk's virtual pipeline stage (interleaved 1F1B), else None
        self.pre_process, self.post_process = pre_process, post_process
        dim, patch = config.hidden_size, config.patch_size
        if pre_process:
            with _init_stream(config, 0):
                self.patch_embed = PatchEmbed(config.in_channels, dim, patch)
                self.cond_adapter = ConditionAdapter(config.condition_channels, dim)
                self.timestep_embedder = TimestepMLP(dim)
                self.motion_embedder = TimestepMLP(dim) if config.use_motion_score else None
        offset = get_transformer_layer_offset(config, vp_stage)
        layers = []
        for i in range(get_num_layers_to_build(config, vp_stage)):
            with _init_stream(config, offset + i + 1):
                layers.append(build_module(layer_spec, config=config, layer_number=offset + i + 1))
        self.layers = torch.nn.ModuleList(layers)
        self.auto_recompute = AutoRecompute(len(layers)) if config.recompute_auto and layers else None
        if post_process:
            self.head_modulation = torch.nn.Linear(dim, 2 * dim)
            self.head_proj = torch.nn.Linear(dim, patch * patch * config.out_channels)
            for linear in (self.head_modulation, self.head_proj):
                torch.nn.init.zeros_(linear.weight)
                torch.nn.init.zeros_(linear.bias)
        self.input_tensor: torch.Tensor | None = None
        # training forwards and backwards replayed from CUDA graphs (model/cuda_graphs.py)
        self.captured_steps = CapturedSteps(self.capturable_forward, self) if config.cuda_graphs else None
        if config.params_dtype != torch.float32:
            self.to(config.params_dtype)

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Pipeline hook: the activation received from the previous stage."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def embed_conditioning(self, timestep: torch.Tensor, motion_score: torch.Tensor | None, dtype) -> torch.Tensor:
        """c (B, D): timestep embedding plus motion-score embedding."""
        c = self.timestep_embedder(timestep, dtype)
        if self.motion_embedder is not None:
            if motion_score is None:
                raise ValueError("this model was built with use_motion_score=True: pass motion_score")
            c = c + self.motion_embedder(motion_score, dtype)
        return c

    def embed_tokens(self, latents: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens plus condition-adapter features, (S, B, D) in t, h, w order."""
        x = self.patch_embed(latents)  # (B, D, T, h, w)
        if condition is None:  # text-to-image/video: the official pipeline feeds zeros
            b, _, t, h, w = latents.shape
            condition = latents.new_zeros(b, self.config.condition_channels, *pixel_shape((t, h, w)))
        features = self.cond_adapter(condition)
        if features.shape != x.shape:
            raise ValueError(
                f"condition of shape {tuple(condition.shape)} gives adapter features "
                f"{tuple(features.shape)}, but the latents give patch tokens {tuple(x.shape)}: the "
                "condition must be the full-resolution clip (4*(T-1)+1 frames, 8x the latent size)"
            )
        return rearrange(x + features, "b d t h w -> (t h w) b d")

    def forward(
        self,
        latents: torch.Tensor | list[torch.Tensor],
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        condition: torch.Tensor | list[torch.Tensor] | None = None,
        motion_score: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Predict the flow-matching velocity.

        Args:
            latents: noisy VAE latents (B, C, T, H, W); images have T = 1. A list of such
                groups (shapes may differ) is one packed sequence (``forward_packed``); a list
                of one group runs as that batch.
            timestep: sigma * 1000, (B,).
            text: text-encoder states (B, L, C_text).
            text_mask: (B, L), True/1 for real tokens.
            condition: (B, 4|5, F, 8H, 8W) = RGB*mask, [depth,] mask; None means all zeros.
            motion_score: (B,), required when the model embeds it.

        Returns:
            velocity (B, C, T, H, W) on the last pipeline stage, else hidden tokens with ``c``
            appended, (S/sp + 1, B, D).
        """
        if isinstance(latents, (list, tuple)) and len(latents) == 1 and self.pre_process and self.post_process:
            # one shape is a plain batch: no per-token modulation, no block masks (with pipeline
            # stages the packed layout stays, as the schedule sized its messages for it)
            return [self.forward(latents[0], timestep, text, text_mask, None if condition is None else condition[0],
                                 motion_score)]
        if isinstance(latents, (list, tuple)):
            return self.forward_packed(list(latents), timestep, text, text_mask, condition, motion_score)
        if self.captured_steps is not None and self.training and torch.is_grad_enabled():
            return self.captured_steps(latents, timestep, text, text_mask, condition, motion_score)
        return self.forward_clip(latents, timestep, *fit_text(text, text_mask, self.row_multiple), condition,
                                 motion_score)

    def forward_clip(self, latents: torch.Tensor, timestep: torch.Tensor, text_keys: torch.Tensor,
                     key_mask: torch.Tensor | None, real_text_keys: int | None, condition: torch.Tensor | None,
                     motion_score: torch.Tensor | None) -> torch.Tensor:
        """``forward`` of one clip shape, the text already the cross-attention's (L, B, C) keys
        with their (B, L) mask and real row count (``fit_text``)."""
        batch, _, frames, height, width = latents.shape
        p = self.config.patch_size
        grid = (frames, height // p, width // p)
        layout = self.token_layout(grid)
        if self.pre_process:
            x = self.scatter(self.embed_tokens(latents, condition), layout)  # (S_pad/cp[/sp], B, D)
            c = self.embed_conditioning(timestep, motion_score, latents.dtype)
        else:  # activations and c from the previous stage
            x, c = self.input_tensor[:-1], self.input_tensor[-1]
        cos, sin = pad_rope(*rope_cos_sin(grid, self.config.kv_channels, self.config.rope_theta, latents.device), layout)
        token_mask = layout.key_padding_mask(batch, latents.device)
        with fp8_context(self.config):
            real_rows = RealRows(None if token_mask is None else layout.tokens, real_text_keys)
            x = self.run_blocks(x, c, text_keys, key_mask, cos, sin, token_mask, real_rows=real_rows)
        if not self.post_process:
            return make_viewless_tensor(torch.cat([x, c[None]]), requires_grad=True, keep_graph=True)
        return self.head(x, c, grid, layout)

    def capturable_forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                           text_mask: torch.Tensor | None, condition: torch.Tensor | None,
                           motion_score: torch.Tensor | None) -> torch.Tensor:
        """``forward`` without reading the text mask on the host (a CUDA graph cannot): all the
        text rows stay keys, the masked ones masked (the same result as trimming them)."""
        keys = text.transpose(0, 1)
        return self.forward_clip(latents, timestep, keys, None if text_mask is None else text_mask.bool(), None,
                                 condition, motion_score)

    def scatter(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """(S, B, D) embedded tokens -> this rank's padded rows (its CP chunk, its SP part)."""
        x = scatter_tokens(tokens, layout)
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def run_blocks(self, x: torch.Tensor, *args: torch.Tensor | None, packed: PackedAttention | None = None,
                   real_rows: RealRows = RealRows()) -> torch.Tensor:
        """The blocks on x; ``args`` = (c, text, text_mask, cos, sin, token_mask); ``packed``: a
        packed sequence's segments, ``real_rows``: a padded clip's real row counts (both bound to
        each layer, as recompute takes only tensors)."""
        c, text, mask, cos, sin, token_mask = args
        auto = self.auto_recompute if self.training and torch.is_grad_enabled() else None
        for index, block in enumerate(self.layers):
            layer = functools.partial(block, packed=packed, real_rows=real_rows)
            if self.recomputes(index):
                # Keep only the block inputs; recompute the block in backward. c goes in as an
                # argument so its gradient is returned, not recomputed through the embedder.
                x = checkpoint_layer(self.config, layer, x, *args)
            elif auto is not None and auto.recomputed is None and index == 0:
                x = auto.measure(lambda tokens: layer(tokens, c, text, mask, (cos, sin), token_mask), x)
            else:
                x = layer(x, c, text, mask, (cos, sin), token_mask)
        return x

    def recomputes(self, index: int) -> bool:
        """Whether this chunk's ``index``-th block is recomputed in backward (full recompute of
        every block, or of the first ``recompute_num_layers`` with the "block" method, or as
        ``recompute=auto`` decided)."""
        if self.auto_recompute is not None:
            return self.training and torch.is_grad_enabled() and self.auto_recompute.recomputes(index)
        if not self.training or self.config.recompute_granularity != "full":
            return False
        return self.config.recompute_method != "block" or index < self.config.recompute_num_layers

    def token_layout(self, grid: tuple[int, int, int]) -> TokenLayout:
        """How a clip of this latent grid is padded and split over CP (and SP) ranks; under FP8
        each rank's rows are also a multiple of 16, as FP8 GEMMs need."""
        return token_layout(math.prod(grid), self.sequence_parallel_size, self.row_multiple)

    @property
    def row_multiple(self) -> int:
        """Rows per CP rank (and text rows) must be a multiple of this: 16 under FP8 (its GEMMs)."""
        return FP8_ROW_MULTIPLE if self.config.fp8 else 1

    @property
    def sequence_parallel_size(self) -> int:
        """TP ranks the tokens are split over (1 without sequence parallelism)."""
        return parallel_state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1

    def head(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int, int], layout: TokenLayout) -> torch.Tensor:
        """adaLN output head: the velocity (B, C, T, H, W), whole on every CP rank (the head's
        small output is gathered, so losses and samplers never see the token split)."""
        return self.unpatchify(self.head_tokens(x, c, layout), grid)

    def head_tokens(self, x: torch.Tensor, c: torch.Tensor, layout: TokenLayout,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """The head's (S, B, p*p*C) real tokens on every CP rank; ``rows``: each of this CP
        rank's rows' sample in a packed sequence (its modulation is per token)."""
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        shift, scale = self.head_modulation(F.silu(c)).float().chunk(2, dim=-1)
        if rows is None:
            shift, scale = shift[None], scale[None]
        else:
            shift, scale = modulation_rows(rows, shift), modulation_rows(rows, scale)
        x = block_glue(self.config.compile_glue).layer_norm_modulate(x, shift, scale)
        x = self.head_proj(x)  # (S_pad/cp, B, p*p*C)
        return gather_tokens(x, layout)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(T*h*w, B, p*p*C) head tokens -> (B, C, T, h*p, w*p); the inverse of ``patchify``."""
        t, h, w = grid
        p = self.config.patch_size
        return rearrange(tokens, "(t h w) b (p q c) -> b c t (h p) (w q)", t=t, h=h, w=w, p=p, q=p)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (T*H/p*W/p, B, p*p*C), the token layout of the head's output."""
        p = self.config.patch_size
        return rearrange(latents, "b c t (h p) (w q) -> (t h w) b (p q c)", p=p, q=p)

    def pipeline_seq_length(self, grid: tuple[int, int, int] | PackedSequence) -> int:
        """megatron's ``seq_length`` for a clip of this token grid (or a packed sequence): its
        schedules divide it by CP (and by TP under SP) into the rows a pipeline stage sends, this
        rank's tokens plus c's (one row per sample of a packed sequence)."""
        layout, rows = (grid.layout, grid.samples) if isinstance(grid, PackedSequence) else (self.token_layout(grid), 1)
        return layout.padded + layout.cp_size * self.sequence_parallel_size * rows

    def packed_sequence(self, shapes: list[torch.Size]) -> PackedSequence:
        """The packed sequence of latent groups of these (b, C, T, H, W) shapes."""
        p = self.config.patch_size
        groups = tuple((b, (t, h // p, w // p)) for b, _, t, h, w in shapes)
        tokens = sum(b * math.prod(grid) for b, grid in groups)
        return PackedSequence(groups, token_layout(tokens, self.sequence_parallel_size,
                                                   self.row_multiple))

    def block_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This TP rank's part of a CP chunk's rows under SP (the rows the blocks modulate)."""
        if not self.config.sequence_parallel:
            return rows
        return rows.chunk(parallel_state.get_tensor_model_parallel_world_size())[
            parallel_state.get_tensor_model_parallel_rank()]

    def forward_packed(self, latents: list[torch.Tensor], timestep: torch.Tensor, text: torch.Tensor,
                       text_mask: torch.Tensor | None, condition: list[torch.Tensor] | None,
                       motion_score: torch.Tensor | None) -> torch.Tensor | list[torch.Tensor]:
        """Groups of latents (b, C, T, H, W) of different shapes as ONE packed sequence (batch 1;
        ``model/packing.py``), each sample computed as if alone. ``timestep``, ``text``,
        ``text_mask`` and ``motion_score`` cover all samples in order; ``condition``: one per
        group. Returns the velocity of each group on the last stage, else the tokens with one
        ``c`` row per sample appended, (S/sp + samples, 1, D)."""
        packed, device = self.packed_sequence([group.shape for group in latents]), latents[0].device
        samples = packed.samples
        if self.pre_process:
            conditions = condition if condition is not None else [None] * len(latents)
            tokens = torch.cat([rearrange(self.embed_tokens(group, cond), "s b d -> (b s) 1 d")
                                for group, cond in zip(latents, conditions)])
            x = self.scatter(tokens, packed.layout)
            c = self.embed_conditioning(timestep, motion_score, latents[0].dtype)  # (samples, D)
        else:
            x, c = self.input_tensor[:-samples], self.input_tensor[-samples:, 0]
        text_keys = pack_text(text, text_mask, samples if packed.padded_rows else None, self.row_multiple)
        rows = packed.local_ids(device)
        attention = PackedAttention(packed.self_attention(device), Segments(rows, text_keys.segment_ids),
                                    self.block_rows(rows))
        cos, sin = packed.rope(self.config.kv_channels, self.config.rope_theta, device)
        with fp8_context(self.config):
            x = self.run_blocks(x, c, text_keys.states, None, cos, sin, None, packed=attention)
        if not self.post_process:
            return make_viewless_tensor(torch.cat([x, c[:, None]]), requires_grad=True, keep_graph=True)
        tokens = self.head_tokens(x, c, packed.layout, rows)
        return [self.unpatchify(group, grid) for group, (_, grid) in zip(packed.split_groups(tokens), packed.groups)]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Layers are keyed by their global index so checkpoints reshard across PP layouts."""
        state = {}
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for name, module in self.named_children():
            if name == "layers":
                continue
            state.update(
                sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
            )
        for layer in self.layers:
            key = f"{prefix}layers.{layer.layer_number - 1}."
            state.update(layer.sharded_state_dict(prefix=key, sharded_offsets=sharded_offsets, metadata=metadata))
        return state


FP8_ROW_MULTIPLE = 16
"""FP8 GEMMs (Transformer Engine) need row counts divisible by 8/16; the 77 text tokens are not."""


def fit_text(text: torch.Tensor, text_mask: torch.Tensor | None,
             row_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(B, L, C) text -> (L', B, C) keys for the cross-attention, with the same result, their
    (B, L') mask and, when that mask only covers added rows, how many rows are real.

    Trailing tokens masked in every sample are dropped (a masked key adds nothing): with one
    prompt per micro-batch no mask is left, so the cross-attention runs on an unmasked kernel.
    Then rows are added up to a multiple of ``row_multiple`` (FP8 GEMMs need 16), masked; the
    attention may cut them off again after the key projection (``attention.attend``)."""
    mask = None if text_mask is None else text_mask.bool()
    if mask is not None:
        kept = mask.cpu()  # (B, L): the one wait for the device, to choose the keys' shape
        columns = kept.any(dim=0).nonzero()
        used = int(columns[-1]) + 1 if len(columns) else kept.shape[1]
        text, mask = text[:, :used], (None if kept[:, :used].all() else mask[:, :used])
    batch, length, _ = text.shape
    extra = -length % row_multiple
    real_rows = length if extra and mask is None else None
    if extra:
        text = F.pad(text, (0, 0, 0, extra))
        real = torch.ones(batch, length, dtype=torch.bool, device=text.device) if mask is None else mask
        mask = F.pad(real, (0, extra), value=False)
    return text.transpose(0, 1), mask, real_rows


@contextlib.contextmanager
def _init_stream(config: MfMConfig, part: int):
    """CPU initialisation of each part (pre-process modules, each layer) from its own seed, so
    the initial weights do not depend on which pipeline stage builds which layers."""
    if not config.use_cpu_initialization:  # GPU init draws from megatron's model-parallel RNG
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed * 100_003 + part)
        yield


def fp8_context(config: MfMConfig) -> contextlib.AbstractContextManager:
    """Transformer Engine's FP8 autocast over the blocks (megatron's recipe and amax group), or
    nothing without FP8."""
    if not config.fp8:
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def checkpoint_layer(config: MfMConfig, layer: torch.nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
    """``layer`` run without keeping its activations, recomputed in backward. Under FP8 this is
    Transformer Engine's checkpoint: it re-enters the FP8 autocast for the recompute and keeps the
    recompute from updating the scaling state (torch's would recompute in bf16)."""

    def run(x, c, text, mask, cos, sin, token_mask):
        return layer(x, c, text, mask, (cos, sin), token_mask)

    if config.fp8:
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(run, False, tensor_parallel.random.get_cuda_rng_tracker,
                             parallel_state.get_tensor_model_parallel_group(), *args)
    return tensor_parallel.checkpoint(run, False, *args)


def build_model(config: MfMConfig, layer_spec: ModuleSpec | None = None, vp_stage: int | None = None) -> MfMDiT:
    """The DiT for this rank's pipeline stage, or for one of its virtual stages (megatron's
    parallel_state must be initialised)."""
    from megatron_mfm.model.specs import default_layer_spec

    return MfMDiT(
        config,
        layer_spec or default_layer_spec(),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )


class ModelChunks(torch.nn.ModuleList):
    """This rank's model: one MfMDiT, or one per virtual pipeline stage (interleaved 1F1B: with
    p pipeline ranks and V chunks, chunk v of rank r holds the (v * p + r)-th slice of layers).
    Checkpoint keys are global layer indices, so the chunks' sharded state dicts merge."""

    @property
    def config(self) -> MfMConfig:
        return self[0].config

    def sharded_state_dict(self) -> dict:
        state = {}
        for chunk in self:
            state.update(chunk.sharded_state_dict())
        return state


def build_model_chunks(config: MfMConfig, layer_spec: ModuleSpec | None = None) -> ModelChunks:
    """Every model chunk this rank runs (one unless ``virtual_pipeline_model_parallel_size``)."""
    stages = config.virtual_pipeline_model_parallel_size
    if not stages:
        return ModelChunks([build_model(config, layer_spec)])
    return ModelChunks([build_model(config, layer_spec, vp_stage=v) for v in range(stages)])
