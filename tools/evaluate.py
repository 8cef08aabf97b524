#!/usr/bin/env python3
"""Per-task quality of a checkpoint on held-out synthetic clips: metrics JSON + a contact sheet.

For each task, ``--samples`` held-out clips (indices from 10^6 on, which training never reaches
in practice) are turned into that task's condition and sampled, then scored against the ground
truth (all PSNRs in dB on pixels in [-1, 1]):

- i2v, itrans, vexd, vtrans: PSNR of the given frames against the condition;
- iinp, ioutp, vinp, voutp: PSNR of the known and of the generated region against ground truth,
  and of the known pixels whose whole latent cell is known (where a sample can match the codec);
- isr, vsr, icolor, vcolor: PSNR and SSIM against ground truth, and those of the degraded input
  (the bicubic upscale, the grey clip): the sample should beat its input;
- vedit: PSNR against the edited clip;
- t2v, t2i: distance of the per-channel colour mean and std to the held-out clips', and the mean
  absolute frame-to-frame difference against the data's (temporal consistency);
- every task: the velocity MSE at fixed sigmas with the true condition and with a zeroed one
  (their ratio says how much the model uses the condition), and the codec's encode-decode
  PSNR over the same region (the ceiling any sample can reach).

``metrics.json`` holds each task's means (``tasks``), its PSNRs pooled over the clips (``pooled``:
the PSNR of their mean squared error), each clip's figures (``per_clip``) and the convergence
goals of the tasks evaluated (``goals``, from the pooled PSNRs: ``CONVERGENCE_GOALS``).

  python tools/evaluate.py --load ckpt --config examples/convergence.yaml --output eval/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron_mfm.checkpoint.model_state import build_from_checkpoint
from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset
from megatron_mfm.diffusion.flow_matching import add_noise, per_sample_mse
from megatron_mfm.diffusion.generation import SCHEDULES, SamplingConfig, generate_batch, task_sample_for
from megatron_mfm.encoders.interface import FrozenEncoders, builtin_encoders
from megatron_mfm.model.geometry import SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel
from megatron_mfm.tasks.builders import GENERATION_TASKS, IMAGE_TASKS, TASKS, TaskSample
from megatron_mfm.utils.atomic import atomic_write_text
from megatron_mfm.utils.media import contact_sheet, write_png

HELD_OUT_START = 10**6
VALIDATION_SIGMAS = (0.25, 0.5, 0.75)
REGION_TASKS = ("iinp", "ioutp", "vinp", "voutp")
TEXT_ONLY_OF = {"iinp": "t2i", "ioutp": "t2i", "vinp": "t2v", "voutp": "t2v"}
"""The text-only task whose sample of the same clip is a region task's baseline (issue 15: the
generated region should be closer to the truth than a text-only sample's same region)."""
RESTORATION_TASKS = ("isr", "vsr", "icolor", "vcolor")
TEXT_ONLY_TASKS = ("t2v", "t2i")
CONVERGENCE_GOALS = (
    # (task, PSNR, reference PSNR, the least dB by which the first must exceed the reference)
    ("i2v", "given_frames_psnr", "codec_given_frames_psnr", -1.0),
    ("iinp", "known_psnr", "codec_known_psnr", -1.0),
    ("iinp", "generated_psnr", "text_only_generated_psnr", 0.0),
    ("isr", "psnr", "input_psnr", 1.0),
    ("icolor", "psnr", "input_psnr", 0.0),
    ("vcolor", "psnr", "input_psnr", 0.0),
)
"""What a run from scratch must reach (issue 15; examples/convergence_h200.sh): i2v and the
inpainting known region within 1 dB of the codec's own encode-decode, the inpainting hole closer
to the truth than a text-only sample, SR 1 dB above bicubic, colourisation above its grey input.
Judged on pooled PSNRs: the held-out set's mean squared error, as the codec's ceiling is."""


def psnr(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """PSNR in dB of clips in [-1, 1] (peak-to-peak 2), over ``region`` (broadcast, bool) if given."""
    squared = (a.float() - b.float()).pow(2)
    if region is not None:
        squared = squared[region.expand_as(squared)]
    return float(10 * torch.log10(4 / squared.mean().clamp_min(1e-10)))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM over channels and frames of (3, F, H, W) clips in [-1, 1] (uniform window, as
    scikit-image's default)."""
    x, y = (t.float().transpose(0, 1) * 0.5 + 0.5 for t in (a, b))  # (F, 3, H, W) in [0, 1]
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def colour_statistics(clip: torch.Tensor) -> torch.Tensor:
    """(6,) per-channel mean and std of a (3, F, H, W) clip."""
    flat = clip.float().flatten(1)
    return torch.cat([flat.mean(dim=1), flat.std(dim=1)])


def frame_difference(clip: torch.Tensor) -> float:
    """Mean absolute change between consecutive frames (0 for an image)."""
    return float((clip[:, 1:] - clip[:, :-1]).abs().mean()) if clip.shape[1] > 1 else 0.0


def known_region(sample: TaskSample) -> torch.Tensor:
    """(1, F, H, W) True where the task reveals the truth (the condition's mask channel is 1)."""
    return sample.condition[-1:] > 0.5


def whole_latent_cells(region: torch.Tensor) -> torch.Tensor:
    """(1, F, H, W) True where ``region`` covers the pixel's whole latent cell (8 x 8 pixels of
    the first frame, or of each later group of 4 frames). Only there can a sample match the codec's
    encoding of the truth: a cell that mixes known and generated pixels encodes both, and the
    low frequencies the codec keeps spread the generated part over the known pixels."""
    first, rest = region[:, :1], region[:, 1:]
    groups = [first] + ([rest.unflatten(1, (-1, TEMPORAL_COMPRESSION)).all(dim=2)] if rest.shape[1] else [])
    cells = torch.cat(groups, dim=1).unflatten(2, (-1, SPATIAL_COMPRESSION)).unflatten(4, (-1, SPATIAL_COMPRESSION))
    cells = cells.all(dim=5).all(dim=3)  # (1, T, H/8, W/8)
    pixels = cells.repeat_interleave(SPATIAL_COMPRESSION, dim=2).repeat_interleave(SPATIAL_COMPRESSION, dim=3)
    return torch.cat([pixels[:, :1], pixels[:, 1:].repeat_interleave(TEMPORAL_COMPRESSION, dim=1)], dim=1)


def sample_metrics(task: str, sample: TaskSample, generated: torch.Tensor, reconstructed: torch.Tensor) -> dict:
    """The task's metrics of one sample; ``reconstructed`` is the ground truth through the codec."""
    truth, mask = sample.pixels, known_region(sample)
    if task in GENERATION_TASKS:
        given = mask.flatten(2).all(dim=2)[0]  # (F,) frames revealed whole
        return {"given_frames_psnr": psnr(generated[:, given], truth[:, given]),
                "codec_given_frames_psnr": psnr(reconstructed[:, given], truth[:, given])}
    if task in REGION_TASKS:
        whole = whole_latent_cells(mask)
        metrics = {"known_psnr": psnr(generated, truth, mask), "generated_psnr": psnr(generated, truth, ~mask),
                   "codec_known_psnr": psnr(reconstructed, truth, mask),
                   "known_whole_cells_share": float(whole.sum() / mask.sum().clamp_min(1))}
        if whole.any():  # else the sample has no such PSNR (the means skip it)
            metrics |= {"known_whole_cells_psnr": psnr(generated, truth, whole),
                        "codec_known_whole_cells_psnr": psnr(reconstructed, truth, whole)}
        return metrics
    if task in RESTORATION_TASKS:
        degraded = sample.condition[:3]
        return {"psnr": psnr(generated, truth), "ssim": ssim(generated, truth),
                "input_psnr": psnr(degraded, truth), "input_ssim": ssim(degraded, truth),
                "codec_psnr": psnr(reconstructed, truth)}
    if task in TEXT_ONLY_TASKS:
        return {"colour_distance": float((colour_statistics(generated) - colour_statistics(truth)).abs().mean()),
                "frame_difference": frame_difference(generated), "data_frame_difference": frame_difference(truth)}
    return {"psnr": psnr(generated, truth), "codec_psnr": psnr(reconstructed, truth)}  # vedit


@torch.no_grad()
def validation_losses(model: torch.nn.Module, encoders: FrozenEncoders, samples: list[TaskSample], seeds: list[int],
                      zero_condition: bool = False) -> list[float]:
    """Per sample, the mean velocity MSE at ``VALIDATION_SIGMAS`` with fixed noise (the training
    objective), every sample and sigma in one forward."""
    device = next(model.parameters()).device
    latents = encoders.encode_video(torch.stack([s.pixels for s in samples]).to(device))
    noise = torch.cat([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed))[None]
                       for seed in seeds]).to(device)
    text, text_mask = encoders.encode_text([s.prompt for s in samples], device)
    condition = torch.stack([s.condition for s in samples]).to(device)
    if zero_condition:
        condition = torch.zeros_like(condition)
    motion = torch.tensor([s.motion_score for s in samples], device=device)
    sigmas = torch.tensor(VALIDATION_SIGMAS, device=device).repeat_interleave(len(samples))  # sigma-major
    noisy, target = add_noise(latents.repeat(len(VALIDATION_SIGMAS), 1, 1, 1, 1),
                              noise.repeat(len(VALIDATION_SIGMAS), 1, 1, 1, 1), sigmas)
    repeat = lambda t: t.repeat(len(VALIDATION_SIGMAS), *[1] * (t.dim() - 1))  # noqa: E731
    output = model(noisy, sigmas * 1000.0, repeat(text), repeat(text_mask), repeat(condition), repeat(motion))
    return per_sample_mse(output, target).view(len(VALIDATION_SIGMAS), -1).mean(dim=0).tolist()


def mean_metrics(rows: list[dict]) -> dict:
    """Each metric's mean over the rows that have it."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: float(np.mean([row[key] for row in rows if key in row])) for key in keys}


def pooled_psnrs(rows: list[dict]) -> dict:
    """Each PSNR's pooled value: the PSNR of the clips' mean squared error. A mean of PSNRs lets
    one clip the codec reproduces exactly (a plain background: 106 dB) outweigh the rest; pooled,
    that clip adds ~nothing, to the ceiling as to a sample."""
    keys = dict.fromkeys(key for row in rows for key in row if key.endswith("psnr"))
    # psnr = 10 log10(4 / mse), so 10 ** (-psnr / 10) is mse / 4
    return {key: float(-10 * np.log10(np.mean([10 ** (-row[key] / 10) for row in rows if key in row])))
            for key in keys}


def goal_checks(pooled: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Each convergence goal whose task was evaluated: its margin in dB (the PSNR less its
    reference), the margin it needs, and whether it is met."""
    checks = {}
    for task, metric, reference, needs in CONVERGENCE_GOALS:
        if task in pooled:
            margin = pooled[task][metric] - pooled[task][reference]
            checks[f"{task}: {metric} - {reference}"] = {"margin_db": margin, "needs_db": needs,
                                                          "met": margin >= needs}
    return checks


def per_clip_metrics(rows: list[dict]) -> dict:
    """Each metric's value per clip (None where a clip has none): with a few clips a task's mean
    moves by tenths of a dB from clip to clip, the size of some goals' margins."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}


def evaluate_task(model: torch.nn.Module, encoders: FrozenEncoders, dataset: SyntheticVideoDataset, task: str,
                  count: int, sampling: SamplingConfig) -> tuple[list[dict], list[torch.Tensor]]:
    """(the metrics of each of ``count`` held-out clips, [condition, sample, truth] of the first);
    the clips are sampled together, in one batch."""
    seeds = [HELD_OUT_START + number for number in range(count)]
    clips = [dataset.clip(index, is_image=task in IMAGE_TASKS) for index in seeds]
    samples = [task_sample_for(clip, task, seed=index) for clip, index in zip(clips, seeds)]
    generated = generate_batch(model, encoders, samples, sampling, seeds).float().cpu()
    truth = torch.stack([sample.pixels for sample in samples])
    reconstructed = encoders.decode_video(encoders.encode_video(truth)).cpu()
    rows = [sample_metrics(task, *row) for row in zip(samples, generated, reconstructed)]
    if task in REGION_TASKS:  # the same clips from their text alone, same noise: the region's baseline
        text_only = [task_sample_for(clip, TEXT_ONLY_OF[task], seed=index) for clip, index in zip(clips, seeds)]
        baseline = generate_batch(model, encoders, text_only, sampling, seeds).float().cpu()
        for row, sample, other in zip(rows, samples, baseline):
            row["text_only_generated_psnr"] = psnr(other, sample.pixels, ~known_region(sample))
    losses = {"loss": validation_losses(model, encoders, samples, seeds)}
    if task not in TEXT_ONLY_TASKS:
        losses["loss_zero_condition"] = validation_losses(model, encoders, samples, seeds, zero_condition=True)
    for number, row in enumerate(rows):
        row.update({key: values[number] for key, values in losses.items()})
    return rows, [samples[0].condition[:3], generated[0], samples[0].pixels]


def figures(metrics: dict[str, float]) -> str:
    """One log line's worth of metrics: ``name value, ...``."""
    return ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())


def labelled_sheet(rows: dict[str, list[torch.Tensor]]) -> np.ndarray:
    """One contact sheet: per task three rows (condition, sample, ground truth) behind its name."""
    from PIL import Image, ImageDraw

    blocks = []
    for task, clips in rows.items():
        block = contact_sheet(clips)
        label = Image.new("RGB", (56, block.shape[0]), "black")
        ImageDraw.Draw(label).text((4, 4), task, fill="white")
        blocks.append(np.concatenate([np.asarray(label), block], axis=1))
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 2), (0, width - b.shape[1]), (0, 0))) for b in blocks], axis=0)


class Bf16Autocast(torch.nn.Module):
    """The model's forward under bf16 autocast, its output in fp32: on a GPU the fused attention
    kernels take the masked text attention (fp32 can leave it to the slow math kernel); the
    codec and the Euler steps stay fp32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(*args).float()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint (iter_XXXXXXX) or save directory (its latest)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--backend", choices=("auto", "te", "local"), default="auto",
                        help="the model's layers: Transformer Engine where installed (auto), te, or torch-native")
    parser.add_argument("--config", help="the run's YAML: clip size and sampling settings come from it")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--samples", type=int, default=4, help="held-out clips per task")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the config's logging.sample_steps)")
    parser.add_argument("--guidance-scale", type=float, help="default: the config's logging.guidance_scale")
    parser.add_argument("--schedule", choices=SCHEDULES, help="default: the config's logging.sample_schedule")
    parser.add_argument("--shift", type=float, help="default: the config's logging.sample_shift")
    parser.add_argument("--output", required=True, help="folder for metrics.json and contact_sheet.png")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    return args


def settings(args: argparse.Namespace) -> tuple[SyntheticConfig, SamplingConfig]:
    """The held-out data and the sampling settings: the run config's, overridden by flags."""
    try:
        config = load_config(args.config) if args.config else load_config()
    except (ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"evaluate.py: --config {args.config}: {error}") from None
    log = config.logging
    sampling = SamplingConfig(
        steps=args.steps or log.sample_steps,
        guidance_scale=log.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        schedule=args.schedule or log.sample_schedule, shift=log.sample_shift if args.shift is None else args.shift,
    )
    return config.data.synthetic, sampling


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data, sampling = settings(args)
    initialize_parallel()
    try:
        try:
            # eager glue: every task and guidance batch is a new shape, each a compilation
            model = build_from_checkpoint(args.load, args.weights, backend=args.backend, compile_glue=False)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"evaluate.py: --load {args.load}: {error}") from None
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model.to(device).eval()
        encoders = builtin_encoders(model.config.text_hidden_size, device=device)
        dataset = SyntheticVideoDataset(data)
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        results, pooled, per_clip, sheets = {}, {}, {}, {}
        report = {"checkpoint": str(args.load), "weights": args.weights, "samples_per_task": args.samples,
                  "device": str(device), "sampling": vars(sampling), "validation_sigmas": list(VALIDATION_SIGMAS),
                  "tasks": results, "pooled": pooled, "per_clip": per_clip, "goals": {}}
        start = time.perf_counter()
        if device.type == "cuda":  # fp32 on the CPU
            model = Bf16Autocast(model)
        for task in args.tasks:
            task_start = time.perf_counter()
            rows, sheets[task] = evaluate_task(model, encoders, dataset, task, args.samples, sampling)
            results[task], pooled[task], per_clip[task] = mean_metrics(rows), pooled_psnrs(rows), per_clip_metrics(rows)
            print(f"{task}: {figures(results[task])} ({time.perf_counter() - task_start:.1f} s)", flush=True)
            if args.samples > 1 and pooled[task]:
                print(f"{task} pooled: {figures(pooled[task])}", flush=True)
            report["goals"].update(goal_checks({task: pooled[task]}))
            # after every task: a run stopped at its time budget keeps the tasks done so far
            report["seconds"] = round(time.perf_counter() - start, 1)
            atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
        seconds = report["seconds"]
    finally:
        destroy_parallel()
    write_png(out / "contact_sheet.png", labelled_sheet(sheets))
    for goal, check in report["goals"].items():
        print(f"goal {goal}: {check['margin_db']:+.2f} dB (needs {check['needs_db']:+.1f}): "
              + ("met" if check["met"] else "missed"))
    print(f"evaluated {len(args.tasks)} tasks x {args.samples} samples in {seconds:.1f} s on {device}")
    print(f"wrote {out / 'metrics.json'} and {out / 'contact_sheet.png'} (per task: condition, sample, truth)")
    return report


if __name__ == "__main__":
    main()
