"""Export the MfM transformer for serving runtimes: torch.export / AOTInductor, ONNX, safetensors.

What is exported is our own megatron model, not a second implementation: ``ServingTransformer``
runs the model's modules (patch embedding, condition adapter, timestep/motion embedders, blocks,
adaLN head) in one process at TP = PP = CP = 1 with the local (torch-native) layer spec. At TP = 1
megatron's parallel linears are a plain matmul inside autograd functions that trace as their
forward, so no layer needs replacing; the wrapper only bypasses ``MfMDiT.forward``'s
parallelism branches (CP token split, pipeline hand-over, FP8 row padding) and its per-shape
RoPE cache, which would pin the frames, height, width and text length to the example's. The
plain reference in ``benchmarks/`` is not used: it is the tests' yardstick, and exporting it
would ship a model other than the one trained and sampled.

Two tracing details keep every size free: sizes of 1 are traced like any other
(``_any_size_tracing``: one prompt without guidance, one image), and the per-frame layers copy
their input (``embeddings.frames_to_batch``) instead of reshaping a view, which would pin the
graph to images or to videos. AOTInductor compiles C++ (or CUDA) for minutes; ONNX takes seconds.

Everything a model needs that a single-process graph cannot hold is refused by name
(``unsupported_features``): tensor, pipeline, context and sequence parallelism, FP8, the
torch.compile'd glue and Transformer Engine layers. Rebuild such a model from its checkpoint
with ``build_for_serving``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
from megatron.core import parallel_state
from torch.export import Dim

from megatron_mfm.checkpoint.model_state import OfficialTensors, build_from_checkpoint, build_from_official
from megatron_mfm.export.official_io import DEFAULT_MAX_SHARD_BYTES, write_official
from megatron_mfm.model.config import MfMConfig, to_official_config
from megatron_mfm.model.dit import MfMDiT
from megatron_mfm.model.geometry import pixel_shape
from megatron_mfm.model.rope import rope_cos_sin
from megatron_mfm.parallel.context import TokenLayout
from megatron_mfm.parallel.initialize import initialize_parallel

# Input names of the exported graph, in order (motion_score only when the model embeds it).
INPUT_NAMES = ("latents", "timestep", "text", "text_mask", "condition", "motion_score")
OUTPUT_NAME = "velocity"
SERVING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_ONNX_OPSET = 18

# Ranges of the dynamic sizes (latent frames, latent height and width in patches, text tokens).
MAX_BATCH = 64
MAX_FRAMES = 128
MAX_PATCHES_PER_SIDE = 512
MAX_TEXT_TOKENS = 4096


def unsupported_features(model: MfMDiT) -> list[str]:
    """What of this model a single-process serving graph cannot hold (empty: exportable)."""
    config = model.config
    found = []
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        found.append("tensor parallelism")
    if not (model.pre_process and model.post_process) or parallel_state.get_pipeline_model_parallel_world_size() > 1:
        found.append("pipeline stages")
    if parallel_state.get_context_parallel_world_size() > 1:
        found.append("context parallelism")
    if config.sequence_parallel:
        found.append("sequence parallelism")
    if config.fp8:
        found.append("FP8")
    if config.compile_glue:
        found.append("compiled glue (compile_glue)")
    if any(type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions")) for m in model.modules()):
        found.append("Transformer Engine layers")
    return found


def check_exportable(model: MfMDiT) -> None:
    """Raise, naming each unsupported feature, unless ``model`` can be exported."""
    found = unsupported_features(model)
    if found:
        raise ValueError(
            f"serving export supports one process (TP=PP=CP=1, local layers, no FP8/SP/compiled glue); "
            f"this model uses {', '.join(found)}: rebuild it with build_for_serving"
        )


class ServingTransformer(torch.nn.Module):
    """``MfMDiT`` as one graph: every input required, all sizes symbolic.

    Inputs: latents (B, C, T, H, W); timestep (B,) = sigma * 1000; text (B, L, C_text);
    text_mask (B, L) bool, True for real tokens; condition (B, 4|5, 4(T-1)+1, 8H, 8W) (zeros for
    text-to-video); motion_score (B,) when the model embeds it. Output: velocity like latents.
    """

    def __init__(self, model: MfMDiT):
        super().__init__()
        check_exportable(model)
        self.model = model.eval()

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                condition: torch.Tensor, motion_score: torch.Tensor | None = None) -> torch.Tensor:
        model, config = self.model, self.model.config
        p = config.patch_size
        grid = (latents.shape[2], latents.shape[3] // p, latents.shape[4] // p)
        x = model.embed_tokens(latents, condition)  # (S, B, D)
        c = model.embed_conditioning(timestep, motion_score, latents.dtype)
        # The uncached tables: the cache would hash the symbolic sizes.
        rope = rope_cos_sin.__wrapped__(grid, config.kv_channels, config.rope_theta, latents.device)
        text_sbh, mask = text.transpose(0, 1).clone(memory_format=torch.contiguous_format), text_mask.bool()
        for layer in model.layers:
            x = layer(x, c, text_sbh, mask, rope, None)
        tokens = x.shape[0]
        return model.head(x, c, grid, TokenLayout(tokens=tokens, padded=tokens, cp_size=1, cp_rank=0))


def input_names(config: MfMConfig) -> tuple[str, ...]:
    return INPUT_NAMES if config.use_motion_score else INPUT_NAMES[:-1]


def example_inputs(config: MfMConfig, batch: int = 2, frames: int = 2, height: int = 4, width: int = 6,
                   text_tokens: int = 5, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Random inputs of the exported signature; ``height``/``width`` are latent pixels."""
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    text_mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    text_mask[0, text_tokens // 2 + 1:] = False  # a padded prompt
    inputs = (
        normal(batch, config.in_channels, frames, height, width),
        torch.rand(batch, generator=generator).mul(1000).to(device, dtype),
        normal(batch, text_tokens, config.text_hidden_size),
        text_mask.to(device),
        normal(batch, config.condition_channels, *pixel_shape((frames, height, width))),
        torch.rand(batch, generator=generator).mul(10).to(device, dtype),
    )
    return inputs if config.use_motion_score else inputs[:-1]


def dynamic_shapes(config: MfMConfig, min_batch: int = 1) -> tuple[dict[int, object] | None, ...]:
    """torch.export dims of each input: batch, latent frames, height, width, text length."""
    batch = Dim("batch", min=min_batch, max=MAX_BATCH)
    frames = Dim("frames", min=1, max=MAX_FRAMES)
    rows = Dim("patch_rows", min=2, max=MAX_PATCHES_PER_SIDE)
    cols = Dim("patch_cols", min=2, max=MAX_PATCHES_PER_SIDE)
    text = Dim("text_tokens", min=1, max=MAX_TEXT_TOKENS)
    latent_grid = (frames, config.patch_size * rows, config.patch_size * cols)
    shapes = (
        {0: batch, **dict(enumerate(latent_grid, start=2))},
        {0: batch},
        {0: batch, 1: text},
        {0: batch, 1: text},
        {0: batch, **dict(enumerate(pixel_shape(latent_grid), start=2))},
        {0: batch},
    )
    return shapes if config.use_motion_score else shapes[:-1]


def _serving_module(model: MfMDiT, dtype: torch.dtype, device: torch.device | str) -> ServingTransformer:
    if dtype not in SERVING_DTYPES.values():
        raise ValueError(f"dtype {dtype}: choose one of {', '.join(SERVING_DTYPES)}")
    return ServingTransformer(model.to(device, dtype))


@contextlib.contextmanager
def _any_size_tracing():
    """Trace sizes of 1 like any other size: without this a graph traced on a batch of 2 would
    refuse a batch of 1 (a single prompt without guidance)."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True), torch.no_grad():
        yield


def export_program(model: MfMDiT, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
    """The transformer as a torch.export program with dynamic batch, frames, height, width and
    text length (the model is cast to ``dtype`` and moved to ``device``)."""
    serving = _serving_module(model, dtype, device)
    with _any_size_tracing():
        return torch.export.export(serving, example_inputs(model.config, dtype=dtype, device=device),
                                   dynamic_shapes=dynamic_shapes(model.config, min_batch_on(device)), strict=False)


def min_batch_on(device: torch.device | str) -> int:
    """The smallest batch a graph for ``device`` takes: 2 on CUDA, where tracing SDPA guards the
    batch against 1 (seen with torch 2.11 on an H200; a guided step always runs 2), else 1."""
    return 2 if torch.device(device).type == "cuda" else 1


def save_aoti_package(model: MfMDiT, path: str | Path, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Path:
    """AOTInductor package (``.pt2``) compiled for ``device``; load it with
    ``torch._inductor.aoti_load_package`` and call it with the inputs of ``INPUT_NAMES``."""
    path = _new_file(path, ".pt2")
    program = export_program(model, dtype, device)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def save_onnx(model: MfMDiT, path: str | Path, dtype: torch.dtype = torch.float32, opset: int = MIN_ONNX_OPSET) -> Path:
    """ONNX model (the dynamo exporter) whose axes batch, frames, patch rows/cols and text tokens
    are dynamic; bf16 is refused (ONNX runtimes rarely run it)."""
    if opset < MIN_ONNX_OPSET:
        raise ValueError(f"ONNX opset {opset}: the dynamo exporter needs opset >= {MIN_ONNX_OPSET}")
    if dtype == torch.bfloat16:
        raise ValueError("ONNX export supports fp32 and fp16, not bf16 (few ONNX runtimes execute bf16)")
    if importlib.util.find_spec("onnxscript") is None:
        raise ModuleNotFoundError("ONNX export needs onnx and onnxscript: pip install 'megatron_mfm[serving]'")
    path = _new_file(path, ".onnx")
    serving = _serving_module(model, dtype, "cpu")
    with _any_size_tracing():
        torch.onnx.export(serving, example_inputs(model.config, dtype=dtype), str(path), dynamo=True,
                          dynamic_shapes=dynamic_shapes(model.config), opset_version=opset,
                          input_names=list(input_names(model.config)), output_names=[OUTPUT_NAME],
                          external_data=False, verbose=False)
    return path


def save_weights(model: MfMDiT, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """The official ``transformer/`` folder (config.json + safetensors) in bf16 or fp16, the
    layout diffusers-based servers load."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"serving weights are bf16 or fp16, not {dtype}")
    check_exportable(model)
    return write_official(folder, to_official_config(model.config), OfficialTensors(model, dtype), max_shard_bytes)


def _new_file(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{path}: the file name must end in {suffix}")
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new path or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build_for_serving(checkpoint: str | Path | None = None, official: str | Path | None = None,
                      weights: str = "raw") -> MfMDiT:
    """The model of a training checkpoint (raw or EMA weights) or of an official/exported folder,
    built in this single process (TP = PP = CP = 1, local layers), in eval mode."""
    if (checkpoint is None) == (official is None):
        raise ValueError("give either a training checkpoint or an official folder")
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError("serving export runs in one process: tensor, pipeline and context parallelism "
                         "are not exported (run without torchrun)")
    initialize_parallel()
    if checkpoint is not None:
        return build_from_checkpoint(checkpoint, weights, backend="local").eval()
    return build_from_official(official, backend="local").eval()
