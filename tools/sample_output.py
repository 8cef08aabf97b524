"""What tools/sample.py writes: one mp4 (24 fps, crf 23, as the official writer) or PNG per sample
and a contact sheet; never into a folder that already holds files unless told to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from megatron_mfm.tasks.builders import TaskSample
from megatron_mfm.utils.media import contact_sheet, to_uint8_frames, write_mp4, write_png

CONTACT_SHEET_SAMPLES = 16
OFFICIAL_CRF = 23


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an --output that is a file, or a folder holding files without --overwrite."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"sample.py: --output {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"sample.py: --output {out} already holds files: choose a new folder or pass --overwrite")


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` to a hidden sibling with the same suffix, then rename: no half-written sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_sample(out: Path, name: str, clip: torch.Tensor, fps: float) -> Path:
    """mp4 for a video, PNG for an image (one frame)."""
    if clip.shape[1] == 1:
        return write_atomically(out / f"{name}.png", lambda p: write_png(p, to_uint8_frames(clip)[0]))
    return write_atomically(out / f"{name}.mp4", lambda p: write_mp4(p, clip, fps, crf=OFFICIAL_CRF))


class SampleWriter:
    """Writes each sample as it comes, and the contact sheet of the first ones at the end."""

    def __init__(self, out: Path, numbered: bool, fps: float):
        self.out, self.numbered, self.fps = out, numbered, fps
        self.count = 0
        self.rows: list[torch.Tensor] = []

    def add(self, task: str, sample: TaskSample, clip: torch.Tensor) -> None:
        name = f"{self.count:04d}_{task}" if self.numbered else task
        self.count += 1
        tqdm.write(f"{write_sample(self.out, name, clip, self.fps)}  prompt: {sample.prompt!r}")
        if len(self.rows) < 2 * CONTACT_SHEET_SAMPLES:  # memory stays bounded over a long prompt file
            self.rows += [sample.condition[:3], clip]

    def finish(self) -> None:
        sheet = write_atomically(self.out / "contact_sheet.png", lambda p: write_png(p, contact_sheet(self.rows)))
        print(f"contact sheet (up to {CONTACT_SHEET_SAMPLES} samples: condition row, sample row): {sheet}")
