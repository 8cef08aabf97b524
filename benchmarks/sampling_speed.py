#!/usr/bin/env python3
"""Seconds per video: the official MfM pipeline against tools/sample.py, in one launch.

Both codes sample the same randomly initialised official-layout pipeline folder
(``benchmarks/random_pipeline.py``: a full-size MfM-2B transformer and CogVideoX VAE, a 2-layer
T5 of the transformer's text width, as text encoding is a negligible share of a video, and a
Depth-Anything-V2-Small-sized depth model; or --folder) at the official script's defaults:
guidance 6, its flow-matching scheduler, 97x352x640, bf16 with latents rounded every step, tiled
VAE decoding, depth for i2v. Per code and task, after a warm-up video (timed apart: it holds
compilation), one video is timed and split by hooks on the text encoder and the transformer
(the device synchronised at each boundary) into text encoding, preparation (inputs, depth,
noise), denoising (first to last transformer call) and the rest (VAE decode and output).

Settings: the official ``MfMPipeline`` exactly as ``infer_mfm_pipeline.py`` runs it. That script
parses ``--compile`` but never uses it and never sets the transformer's
``enable_cached_compile`` (false in the folder's config.json), so it runs eagerly, with SDPA on
whatever backend torch picks for its calls (recorded in ``official_sdpa``; its FlashAttention-2
path is not taken: FlashAttention-2 is not installed beside FlashAttention-4). Ours: sample.py
with compiled glue and FlashAttention-4 where it imports, else cuDNN.

--timed-steps N < --steps times N Euler steps and extrapolates the denoising to --steps (every
step runs the same shapes; the JSON says so): the full set fits one device call that way.

  python benchmarks/sampling_speed.py --official-repo .gpu/official --timed-steps 10 --output speed.json  # H200
  python benchmarks/sampling_speed.py --official-repo ~/src/MfM --device cpu --preset tiny --frames 9 \\
      --height 64 --width 96 --steps 2 --output speed.json                                              # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.nn.attention import SDPBackend

from benchmarks.random_pipeline import write_random_pipeline
from benchmarks.timing import release_memory, synchronize
from megatron_mfm.diffusion.generation import OFFICIAL_NEGATIVE_PROMPT, OFFICIAL_TASK_DEFAULTS, official_prompt
from megatron_mfm.model.attention_backends import unavailable_reason
from megatron_mfm.model.presets import PRESETS
from megatron_mfm.parallel.initialize import initialize_parallel
from tools import sample as sample_tool
from tools.official_pipeline import load_official_pipeline

CAPTION = "a red kite rising over a beach at sunset"
SDPA_BACKENDS = {member.value: name for name, member in SDPBackend.__members__.items()}


class PhaseTimer:
    """Phases of one video from forward hooks on its text encoder and denoiser, the device
    synchronised at every boundary (one sync per transformer call: negligible)."""

    def __init__(self, text_encoder: torch.nn.Module, denoiser: torch.nn.Module):
        self.text_s, self.calls, self._started = 0.0, [], 0.0
        self.handles = [
            text_encoder.register_forward_pre_hook(lambda *_: self._begin()),
            text_encoder.register_forward_hook(lambda *_: self._end_text()),
            denoiser.register_forward_pre_hook(lambda *_: self._begin()),
            denoiser.register_forward_hook(lambda *_: self.calls.append((self._started, self._now()))),
        ]

    @staticmethod
    def _now() -> float:
        synchronize()
        return time.perf_counter()

    def _begin(self) -> None:
        self._started = self._now()

    def _end_text(self) -> None:
        self.text_s += self._now() - self._started

    def measure(self, video: Callable[[], object]) -> dict:
        self.text_s, self.calls = 0.0, []
        start = self._now()
        video()
        end = self._now()
        first, last = self.calls[0][0], self.calls[-1][1]
        return {"total_s": end - start, "text_encode_s": self.text_s, "prepare_s": first - start - self.text_s,
                "denoise_s": last - first, "decode_s": end - last, "transformer_calls": len(self.calls)}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def recorded_sdpa_backends(seen: set):
    """Adds (query shape, masked, backend torch picks) of every F.scaled_dot_product_attention call."""
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
        seen.add((str(tuple(query.shape)), attn_mask is not None, SDPA_BACKENDS.get(choice, str(choice))))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def official_code(args, folders: dict[str, str], image: str):
    """(text encoder, transformer, video(task, steps), settings) of the official pipeline."""
    pipe = load_official_pipeline(args.official_repo, folders["pipeline"], folders["depth"], args.device, torch.bfloat16)

    def video(task: str, steps: int):
        return pipe(official_prompt(CAPTION, task), OFFICIAL_NEGATIVE_PROMPT, height=args.height, width=args.width,
                    num_frames=args.frames, input_path=image if task == "i2v" else None, mask_path=None,
                    noise_aug_strength=0.0, motion_score=5.0, num_inference_steps=steps,
                    guidance_scale=OFFICIAL_TASK_DEFAULTS[task].guidance_scale, upscale=4, crop_type="keep_ratio",
                    task=task, trans_nums=[1] if task == "i2v" else [], use_t_schedule=False,
                    generator=torch.Generator(args.device).manual_seed(0)).frames

    settings = {"enable_cached_compile": bool(pipe.transformer.config.get("enable_cached_compile", False)),
                "dtype": "bf16 (pipeline cast, as the script)", "guidance": "one batch of 2 per step"}
    return pipe.text_encoder, pipe.transformer, video, settings


def our_code(args, folders: dict[str, str], image: str, output: str):
    """(text encoder, transformer, video(task, steps), settings) of tools/sample.py."""
    common = ["--official", folders["pipeline"], "--depth-path", folders["depth"], "--prompt", CAPTION,
              "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
              "--dtype", "bfloat16", "--device", args.device, "--attention-backend", args.attention_backend,
              "--output", output, *(["--compile-glue"] if args.compile_glue else [])]
    sampler = sample_tool.load_sampler(sample_tool.parse_args([*common, "--tasks", "t2v"]))

    def video(task: str, steps: int):
        sample_args = sample_tool.parse_args([*common, "--tasks", task, "--steps", str(steps),
                                              *(["--image", image] if task == "i2v" else [])])
        prepared = sample_tool.prepared_sample(sample_tool.requests_of(sample_args)[0], sample_args)
        return sample_tool.render(sampler, prepared, sample_args, torch.Generator(sampler.device).manual_seed(0))

    core = type(sampler.model.layers[0].self_attention.core_attention).__name__
    settings = {"attention_backend": args.attention_backend, "core_attention": core, "compile_glue": args.compile_glue,
                "layers": type(sampler.model.layers[0].self_attention.linear_qkv).__name__,
                "dtype": "bf16", "guidance": "two batches of 1 per step"}
    return sampler.encoders.text.encoder, sampler.model, video, settings


def time_code(name: str, build, args) -> dict:
    """Warm-up and timed videos of one code, its settings and peak memory."""
    on_gpu = args.device == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    text_encoder, denoiser, video, settings = build()
    result = {"code": name, "settings": settings, "load_s": time.perf_counter() - start,
              "weights_gib": torch.cuda.memory_allocated() / 2**30 if on_gpu else None}
    timer, sdpa = PhaseTimer(text_encoder, denoiser), set()
    try:
        with recorded_sdpa_backends(sdpa) if name == "official" else contextlib.nullcontext():
            result["warmup"] = timer.measure(lambda: video(args.tasks[0], args.warmup_steps))
        result["warmup"]["task"], result["warmup"]["steps"] = args.tasks[0], args.warmup_steps
        result["tasks"] = {}
        for task in args.tasks:
            phases = timer.measure(lambda: video(task, args.timed_steps))
            per_step = phases["denoise_s"] / args.timed_steps
            phases.update(step_s=per_step, seconds_per_video=phases["total_s"] + per_step * (args.steps - args.timed_steps))
            result["tasks"][task] = phases
    finally:
        timer.remove()
    if sdpa:
        result["official_sdpa"] = [dict(zip(("query", "masked", "backend"), call)) for call in sorted(sdpa)]
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    return result


def pipeline_folder(args, scratch: Path) -> dict[str, str]:
    """--folder as it is when it holds a pipeline, else a new random one written there (or in scratch)."""
    root = Path(args.folder) if args.folder else scratch / "pipeline"
    if (root / "transformer").is_dir():
        print(f"using the pipeline folder {root}", flush=True)
        return {"pipeline": str(root), "depth": str(root / "depth")}
    start = time.perf_counter()
    folders = write_random_pipeline(root, args.preset, args.device)
    print(f"wrote a random {args.preset} pipeline folder to {root} in {time.perf_counter() - start:.0f} s", flush=True)
    return folders


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", required=True, help="checkout of github leeruibin/MfM")
    parser.add_argument("--folder", help="pipeline folder to use, or to write a random one into (default: a temporary one)")
    parser.add_argument("--build-only", action="store_true", help="write the random --folder and stop")
    parser.add_argument("--preset", default="mfm-2b", choices=sorted(PRESETS), help="transformer of a new random folder")
    parser.add_argument("--tasks", nargs="+", default=["t2v", "i2v"], choices=["t2v", "i2v"])
    parser.add_argument("--codes", nargs="+", default=["official", "ours"], choices=["official", "ours"])
    parser.add_argument("--frames", type=int, default=97)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--steps", type=int, default=30, help="Euler steps a video has (reported)")
    parser.add_argument("--timed-steps", type=int, help="Euler steps run (default --steps; fewer: extrapolated)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="Euler steps of each code's warm-up video")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--attention-backend", help="ours (default: fa4 where it runs, else cudnn; sdpa on the CPU)")
    parser.add_argument("--compile-glue", default=None, action=argparse.BooleanOptionalAction,
                        help="ours: compiled glue (default: on the GPU)")
    parser.add_argument("--output", default="sampling_speed.json", help="JSON file (rewritten after each code)")
    args = parser.parse_args(argv)
    args.timed_steps = args.timed_steps or args.steps
    if not 1 <= args.timed_steps <= args.steps:
        parser.error(f"--timed-steps {args.timed_steps} must be between 1 and --steps {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    gpu = args.device == "cuda"
    args.compile_glue = gpu if args.compile_glue is None else args.compile_glue
    args.attention_backend = args.attention_backend or (
        ("fa4" if unavailable_reason("fa4", True) is None else "cudnn") if gpu else "sdpa")
    return args


def print_table(report: dict) -> None:
    print(f"seconds per video, {report['steps']} steps at {report['shape']}"
          + (f" (denoising timed over {report['timed_steps']} steps, extrapolated)" if report["extrapolated"] else ""))
    print(f"{'code':>8} {'task':>4} {'video s':>8} {'text':>6} {'prepare':>7} {'denoise':>8} {'step':>6} "
          f"{'decode':>7} {'peak GiB':>8} {'warm-up s':>9}")
    for code in report["codes"]:
        for task, t in code.get("tasks", {}).items():
            denoise = t["step_s"] * report["steps"]
            peak = code["peak_memory_gib"]
            print(f"{code['code']:>8} {task:>4} {t['seconds_per_video']:8.2f} {t['text_encode_s']:6.2f} "
                  f"{t['prepare_s']:7.2f} {denoise:8.2f} {t['step_s']:6.3f} {t['decode_s']:7.2f} "
                  f"{peak if peak is None else round(peak, 1)!s:>8} {code['warmup']['total_s']:9.1f}")
    for task, speedup in report.get("speedup", {}).items():
        print(f"{task}: ours {speedup:.2f}x the official pipeline's speed")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    initialize_parallel()
    with tempfile.TemporaryDirectory() as scratch:
        folders = pipeline_folder(args, Path(scratch))
        if args.build_only:
            return {}
        image = Path(scratch) / "first_frame.png"
        noise = torch.randint(0, 256, (args.height, args.width, 3), generator=torch.Generator().manual_seed(0))
        Image.fromarray(noise.to(torch.uint8).numpy()).save(image)
        report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "torch": torch.__version__, "preset": args.preset, "shape": f"{args.frames}x{args.height}x{args.width}",
                  "steps": args.steps, "timed_steps": args.timed_steps, "extrapolated": args.timed_steps != args.steps,
                  "text_encoder": "2-layer T5 of the transformer's text width (not the real T5)", "codes": []}
        builders = {"official": lambda: official_code(args, folders, str(image)),
                    "ours": lambda: our_code(args, folders, str(image), str(Path(scratch) / "samples"))}
        for name in args.codes:
            report["codes"].append(time_code(name, builders[name], args))
            release_memory()
            seconds = {c["code"]: c["tasks"] for c in report["codes"]}
            if {"official", "ours"} <= set(seconds):
                report["speedup"] = {task: seconds["official"][task]["seconds_per_video"]
                                     / seconds["ours"][task]["seconds_per_video"] for task in args.tasks}
            Path(args.output).write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


if __name__ == "__main__":
    main()
