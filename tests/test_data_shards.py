"""data_prep/make_shards.py and the shard reader on real media the test writes (PyAV H.264,
JPEG, PNG), plus a truncated video and a non-video: round-trip, skip-and-count, resume, decode."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mfm.data.decode.pyav import MediaError, decode_clip, probe, video_timing
from megatron_mfm.data.shards.reader import clip_from_sample, iter_shard
from megatron_mfm.utils.media import write_mp4

ROOT = Path(__file__).resolve().parents[1]


def moving_square(frames: int, height: int, width: int, colour: tuple[float, float, float]) -> torch.Tensor:
    pixels = -torch.ones(3, frames, height, width)
    for f in range(frames):
        x = f * (width - 8) // max(frames - 1, 1)
        pixels[:, f, height // 2 - 4:height // 2 + 4, x:x + 8] = torch.tensor(colour)[:, None, None]
    return pixels


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    for i, colour in enumerate([(1, -1, -1), (-1, 1, -1), (-1, -1, 1)]):
        write_mp4(folder / f"clip{i}.mp4", moving_square(24, 64, 96, colour), fps=24)
        (folder / f"clip{i}.txt").write_text(f"a square moving right, number {i}")
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(folder / "still.jpg")
    (folder / "still.txt").write_text("a grey picture")
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(folder / "dark.png")  # below --min-side
    data = (folder / "clip0.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "notes.mp4").write_bytes(b"this is not a video at all\n" * 50)
    return folder


def make_shards(media: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / "make_shards.py"), "--input", str(media), "--output", str(out),
         "--shard-size-mb", "0.002", "--workers", "2", "--min-frames", "17", "--min-side", "64", *extra],
        capture_output=True, text=True, timeout=300)


def test_probe_and_decode_real_files(media):
    info = probe((media / "clip1.mp4").read_bytes(), "clip1.mp4")
    assert (info.kind, info.width, info.height, info.frames, info.codec) == ("video", 96, 64, 24, "h264")
    assert info.fps == 24
    with pytest.raises(MediaError, match="notes.mp4"):
        probe((media / "notes.mp4").read_bytes(), "notes.mp4")
    clip = decode_clip((media / "clip2.mp4").read_bytes(), "clip2.mp4", frames=9, height=32, width=32, fps=12)
    assert clip.shape == (3, 9, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    blue = clip[2].mean() - clip[0].mean()
    assert blue > 0.01, "the blue square survives decoding and resizing"


def test_shards_round_trip_skip_bad_files_and_resume(media, tmp_path):
    out = tmp_path / "shards"
    result = make_shards(media, out)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert index["samples"] == 4 and report["kept"] == 4  # 3 clips + still.jpg
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"truncated.mp4", "notes.mp4", "dark.png"}
    assert skipped["dark.png"] == "shorter side 50 < --min-side 64"
    assert index["buckets"] == {"image/0p/landscape": 1, "video/0p/landscape": 3}
    shard_files = sorted(out.glob("shard-*.tar"))
    assert len(shard_files) == len(index["shards"]) > 1
    assert sum(s["samples"] for s in index["shards"]) == 4

    seen = {}
    for shard in shard_files:
        for key, name, data, record in iter_shard(shard):
            source = Path(record["source"])
            assert data == source.read_bytes(), "media bytes are stored as they are"
            caption = source.with_suffix(".txt")
            assert record["caption"] == (caption.read_text().strip() if caption.exists() else "")
            seen[source.name] = (key, name, data, record)
    assert set(seen) == {"clip0.mp4", "clip1.mp4", "clip2.mp4", "still.jpg"}

    clip = clip_from_sample(*seen["clip0.mp4"], frames=17, height=32, width=48, fps=24)
    assert clip.pixels.shape == (3, 17, 32, 48) and clip.caption.startswith("a square")
    image = clip_from_sample(*seen["still.jpg"], frames=17, height=32, width=48)
    assert image.is_image and image.pixels.shape == (3, 1, 32, 48)

    # Resume: a missing shard is rewritten, finished ones are left alone.
    stamps = {p.name: p.stat().st_mtime_ns for p in shard_files}
    shard_files[0].unlink()
    again = make_shards(media, out)
    assert again.returncode == 0 and "(1 written now)" in again.stdout
    for p in sorted(out.glob("shard-*.tar"))[1:]:
        assert p.stat().st_mtime_ns == stamps[p.name]
    with tarfile.open(shard_files[0]) as tar:
        assert len(tar.getmembers()) == 2 * index["shards"][0]["samples"]


def test_filters_and_manifest(media, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"path": str(media / "clip0.mp4"), "caption": "red", "source_id": 7},
            {"path": str(media / "still.jpg"), "caption": "grey"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    result = make_shards(manifest, out, "--min-frames", "30")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [Path(s["path"]).name for s in report["skipped"]] == ["clip0.mp4"]
    assert "24 frames < --min-frames 30" in report["skipped"][0]["reason"]
    records = [r for shard in sorted(out.glob("*.tar")) for *_, r in iter_shard(shard)]
    assert [r["caption"] for r in records] == ["grey"]


def test_rerun_after_adding_inputs_keeps_index_and_shards_in_agreement(media, tmp_path, capsys):
    from data_prep import make_shards as tool
    from megatron_mfm.data.shards.catalog import load_catalog, read_sample

    inputs, out = tmp_path / "inputs", tmp_path / "shards"
    inputs.mkdir()
    for name in ("clip0.mp4", "clip1.mp4"):
        (inputs / name).write_bytes((media / name).read_bytes())
    argv = ["--input", str(inputs), "--output", str(out), "--workers", "1", "--min-side", "64"]
    assert tool.main(argv)["samples"] == 2 and "(1 written now)" in capsys.readouterr().out
    first = (out / "shard-000000.tar").read_bytes()
    (inputs / "clip2.mp4").write_bytes((media / "clip2.mp4").read_bytes())  # sorts after, lands in no shard yet
    (inputs / "a_still.jpg").write_bytes((media / "still.jpg").read_bytes())  # sorts first

    index = tool.main(argv)
    assert "(1 written now)" in capsys.readouterr().out
    assert (out / "shard-000000.tar").read_bytes() == first, "a finished shard never changes"
    assert index == json.loads((out / "index.json").read_text())
    assert index["samples"] == 4 and [s["samples"] for s in index["shards"]] == [2, 2]
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            assert len(tar.getmembers()) == 2 * shard["samples"]
    entries = load_catalog(out)
    assert len(entries) == 4
    sources = {Path(read_sample(out, entry)[1]["source"]).name for entry in entries}
    assert sources == {"clip0.mp4", "clip1.mp4", "clip2.mp4", "a_still.jpg"}

    assert tool.main(argv) == index and "(0 written now)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["missing_folder", "missing.jsonl", "missing.csv"])
def test_missing_input_is_one_line(tmp_path, name):
    from data_prep import make_shards as tool

    with pytest.raises(SystemExit) as exit_:  # a message, not a traceback, and exit status 1
        tool.main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out")])
    assert exit_.value.code == f"--input {tmp_path / name}: no such file or folder"


def write_grey_video(path: Path, codec: str, rate: int, stamps: list[int]) -> None:
    """Frame i is a flat grey of level 20 + 8 i, shown at ``stamps[i]`` / ``rate`` seconds."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        for i, stamp in enumerate(stamps):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 + 8 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """Which source frames a clip of ``write_grey_video`` frames shows, from their grey level."""
    levels = (clip.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round((level - 20) / 8) for level in levels.tolist()]


def test_avi_declaring_frame_slots_probes_and_decodes_at_its_real_rate(tmp_path):
    path = tmp_path / "slots.avi"  # MPEG-4 part 2 in AVI: 24 fps as every 10th slot of 240
    write_grey_video(path, "mpeg4", 240, [10 * i for i in range(24)])
    data = path.read_bytes()
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 240, "the file declares frame slots"
    info = probe(data, path.name)
    assert (info.frames, info.fps, info.codec) == (24, 24, "mpeg4")
    assert frame_numbers(decode_clip(data, path.name, frames=9, height=32, width=32, fps=12)) == list(range(0, 18, 2))


def test_variable_frame_rate_clip_is_sampled_by_timestamp(tmp_path):
    path = tmp_path / "vfr.mp4"  # 10 frames at 10 fps, then 20 at 40 fps (milliseconds)
    stamps = [100 * i for i in range(10)] + [1000 + 25 * i for i in range(20)]
    write_grey_video(path, "h264", 1000, stamps)
    data = path.read_bytes()
    info = probe(data, path.name)
    assert info.frames == 30 and info.fps == pytest.approx(29 / 1.475)
    expected = list(range(10)) + [10, 14, 18]  # the frames shown at 0, 0.1, ..., 1.2 s
    assert video_timing(data).source_frames(13, 10, path.name) == expected  # what every backend decodes
    assert frame_numbers(decode_clip(data, path.name, frames=13, height=32, width=32, fps=10)) == expected
    with pytest.raises(MediaError, match="vfr.mp4: 30 frames in 1.475 s, 17 frames at 10 fps need 1.600 s"):
        decode_clip(data, path.name, frames=17, height=32, width=32, fps=10)
