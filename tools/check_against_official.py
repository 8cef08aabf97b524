#!/usr/bin/env python3
"""Check a megatron_mfm checkpoint against the official MfM ``Transformer3DModel``.

Exports the checkpoint to the official layout, loads it with the official code from a local
checkout of github leeruibin/MfM (needs diffusers), runs both models on the same random inputs
in fp32 and prints the relative error. Nothing of the official repository is part of this
project: pass its path.

  python tools/check_against_official.py --mfm-repo ~/src/MfM --load ckpt/mfm
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()

from megatron_mfm.export.key_map import to_official
from megatron_mfm.checkpoint.model_state import build_from_checkpoint, global_state
from megatron_mfm.export.official_io import write_official
from megatron_mfm.model.config import to_official_config
from megatron_mfm.parallel.initialize import destroy_parallel, initialize_parallel
from tools.official_repo import load_official_class


def random_inputs(config, frames: int, height: int, width: int, text_len: int = 77, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, pixel_frames = 2, 4 * (frames - 1) + 1
    mask = torch.ones(batch, text_len)
    mask[0, text_len // 2:] = 0
    return {
        "hidden_states": torch.randn(batch, config.in_channels, frames, height, width, generator=g),
        "conditional_pixel_values": torch.randn(batch, config.condition_channels - 1, pixel_frames, 8 * height, 8 * width, generator=g),
        "conditional_masks": (torch.rand(batch, 1, pixel_frames, 8 * height, 8 * width, generator=g) > 0.5).float(),
        "encoder_hidden_states": torch.randn(batch, text_len, config.text_hidden_size, generator=g),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([900.0, 100.0]),
        "motion_score": torch.tensor([5.0, 0.0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfm-repo", required=True, type=Path, help="local checkout of the official MfM repository")
    parser.add_argument("--load", required=True, help="megatron_mfm checkpoint directory")
    parser.add_argument("--frames", type=int, default=3, help="latent frames (1 = image)")
    parser.add_argument("--height", type=int, default=8, help="latent height")
    parser.add_argument("--width", type=int, default=8, help="latent width")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error accepted")
    args = parser.parse_args()

    official_cls = load_official_class(args.mfm_repo)
    initialize_parallel()
    try:
        model = build_from_checkpoint(args.load)
        config = model.config
        model.eval()
        inputs = random_inputs(config, args.frames, args.height, args.width)
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_official(Path(tmp) / "transformer", to_official_config(config), to_official(global_state(model), config))
            official, info = official_cls.from_pretrained(folder, output_loading_info=True, torch_dtype=torch.float32)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise SystemExit(f"official model loading reported problems: {bad}")
        official.post_setup_sequence_parallel(None)
        official.eval()
        with torch.no_grad():
            expected = official(**inputs, return_dict=False)[0]
            ours = model(
                latents=inputs["hidden_states"], timestep=inputs["timestep"], text=inputs["encoder_hidden_states"],
                text_mask=inputs["encoder_attention_mask"],
                condition=torch.cat([inputs["conditional_pixel_values"], inputs["conditional_masks"]], dim=1),
                motion_score=inputs["motion_score"],
            )
        error = ((ours - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        print(f"official vs megatron_mfm: relative error {error:.3e} (output norm {expected.norm():.4g})")
        if not error < args.tolerance:
            raise SystemExit(f"relative error {error:.3e} exceeds {args.tolerance}")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
