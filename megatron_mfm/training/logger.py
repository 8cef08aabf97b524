"""Megatron-style iteration lines on the console, plus TensorBoard and wandb (rank 0 only)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_mfm.config import LoggingConfig


class MetricsLogger:
    """Writes one line per logged iteration and scalars to TensorBoard/wandb when enabled."""

    def __init__(self, config: LoggingConfig, run_config: dict, total_iterations: int):
        self.total = total_iterations
        self.active = dist.get_rank() == 0
        self.tensorboard = None
        self.wandb = None
        self.metrics_file = None
        if not self.active:
            return
        if config.metrics_file:
            Path(config.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(config.metrics_file, "a")
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(config.tensorboard_dir)
        if config.wandb_project:
            import wandb

            os.environ.setdefault("WANDB_MODE", config.wandb_mode)
            self.wandb = wandb.init(project=config.wandb_project, config=run_config,
                                    dir=config.tensorboard_dir or None, mode=os.environ["WANDB_MODE"])

    def print(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def log(self, iteration: int, metrics: dict[str, Any]) -> None:
        """``metrics``: scalars; keys of ``LINE_FORMAT`` go to the console line in that order."""
        if not self.active:
            return
        parts = [f"{_timestamp()} iteration {iteration:8d}/{self.total:8d}"]
        for key, fmt in LINE_FORMAT.items():
            if key in metrics and metrics[key] is not None:
                parts.append(f"{key}: {metrics[key]:{fmt}}")
        task_losses = " ".join(f"{k[5:]}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss/"))
        if task_losses:
            parts.append(f"task losses: {task_losses}")
        print(" | ".join(parts), flush=True)
        self._record(iteration, metrics)

    def log_event(self, iteration: int, title: str, metrics: dict[str, float]) -> None:
        """Metrics of something besides a training step (validation, a checkpoint): one console
        line and their own record at ``iteration``."""
        if not self.active:
            return
        values = " | ".join(f"{key}: {value:.6g}" for key, value in metrics.items())
        print(f"{_timestamp()} {title} at iteration {iteration} | {values}", flush=True)
        self._record(iteration, metrics)

    def _record(self, iteration: int, metrics: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
            self.metrics_file.flush()
        for key, value in metrics.items():
            if value is not None and self.tensorboard is not None:
                self.tensorboard.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=iteration)

    def log_image(self, tag: str, image, iteration: int) -> None:
        """An HWC uint8 image (e.g. a contact sheet of samples)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, iteration, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=iteration)

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _timestamp() -> str:
    return time.strftime("[%Y-%m-%d %H:%M:%S]")


LINE_FORMAT = {
    "consumed samples": "12d",
    "elapsed time per iteration (ms)": ".1f",
    "throughput per GPU (TFLOP/s/GPU)": ".2f",
    "MFU": ".2%",
    "learning rate": ".3E",
    "global batch size": "5d",
    "loss": ".6E",
    "grad norm": ".4f",
    "number of skipped iterations": "3d",
    "samples/s": ".2f",
    "tokens/s": ".1f",
    "data wait per iteration (ms)": ".1f",
    "step time min (ms)": ".1f",
    "step time median (ms)": ".1f",
    "step time max (ms)": ".1f",
    "slowest rank": "d",
    "mem max allocated (GB)": ".2f",
    "mem max reserved (GB)": ".2f",
    "mem max RSS (GB)": ".2f",
    "skipped samples": "d",
    "sidecar misses": "d",
}
