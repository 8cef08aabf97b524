"""The synthetic data's ``photo`` backgrounds: scikit-image's sample photographs, panned and
zoomed (``data/photos.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_mfm.data import photos
from megatron_mfm.data.photos import Pan, load_photo, pan_frames
from megatron_mfm.data.synthetic import SyntheticConfig, SyntheticVideoDataset

WHOLE = (0.5, 0.5, 1.0)  # the square window that is the whole of a square photo


def test_a_window_on_pixel_centres_returns_the_photo():
    photo = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pan_frames(photo, WHOLE, WHOLE, 1, 40, 40)[:, 0], photo, rtol=0, atol=1e-5)


def test_a_large_photo_is_averaged_not_aliased():
    """512 x 512 into 64 x 64: 8 x 8 blocks averaged, as area downscaling does."""
    astronaut = load_photo("astronaut.png").float() / 255
    expected = F.interpolate(astronaut[None], size=(64, 64), mode="area")[0]
    rendered = Pan("astronaut.png", WHOLE, WHOLE).render(1, 64, 64)[:, 0]
    torch.testing.assert_close(rendered, expected, rtol=0, atol=1e-6)


def test_photo_clips_are_deterministic_move_and_say_what_they_show():
    config = SyntheticConfig(frames=9, height=64, width=64, backgrounds=["photo"], seed=3)
    first, again = SyntheticVideoDataset(config), SyntheticVideoDataset(config)
    for index in range(3):
        clip = first.clip(index, is_image=False)
        assert torch.equal(clip.pixels, again.clip(index, is_image=False).pixels)
        assert clip.pixels.shape == (3, 9, 64, 64) and -1 <= clip.pixels.min() and clip.pixels.max() <= 1
        assert (clip.pixels[:, 1:] - clip.pixels[:, :-1]).abs().mean() > 0.01  # the camera moves
        assert " on a photo of " in clip.caption
        assert clip.pixels.std() > 0.1  # texture, not a flat ground
        image = first.clip(index, is_image=True)
        assert image.pixels.shape == (3, 1, 64, 64) and image.edit_source is None


def test_photo_backgrounds_without_scikit_image_fail_in_one_line(monkeypatch):
    monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"photo needs scikit-image's sample photographs: pip install"):
        SyntheticConfig(backgrounds=["plain", "photo"])
