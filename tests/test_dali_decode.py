"""The DALI decode backend against the PyAV one on the same bytes (VP9 and PNG written here, since
DALI's CPU decoder refuses H.264), its errors, the backend selector, and benchmarks/dataloader.py.

Tolerance, DALI (CPU) vs PyAV on the same frames, in [-1, 1] units: mean absolute difference
under 0.015 (2/255) and 99th percentile under 0.15; the rare larger differences sit on sharp
colour edges, where DALI's YUV -> RGB chroma upsampling differs from swscale's."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from megatron_mfm.data.decode.dali import ClipRequest, DaliDecodeConfig, DaliDecoder, decode_backend  # noqa: E402
from megatron_mfm.data.decode.pyav import MediaError, decode_clip, frame_indices  # noqa: E402
from megatron_mfm.utils.media import write_mp4  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FRAMES, SOURCE_FPS = 24, 24
MEAN_TOLERANCE, P99_TOLERANCE = 0.015, 0.15


def distinct_frames(frames: int, height: int, width: int) -> torch.Tensor:
    """(3, F, H, W): every frame a different red level, in scrambled order (consecutive frames far
    apart), plus a moving yellow square and a blue band for colour edges and motion."""
    pixels = -torch.ones(3, frames, height, width)
    for f in range(frames):
        pixels[0, f] = -1 + 2 * ((f * 7) % frames) / (frames - 1)
        x = f * (width - 16) // (frames - 1)
        pixels[:, f, height // 4:height // 4 + 16, x:x + 16] = torch.tensor([1.0, 1.0, -1.0])[:, None, None]
        pixels[2, f, :, : width // 8] = 0.5
    return pixels


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("dali_media")
    clip = distinct_frames(SOURCE_FRAMES, 72, 128)
    files = {"vp9.mp4": write_mp4(folder / "vp9.mp4", clip, fps=SOURCE_FPS, codec="libvpx-vp9"),
             "h264.mp4": write_mp4(folder / "h264.mp4", clip, fps=SOURCE_FPS)}
    media = {name: path.read_bytes() for name, path in files.items()}
    image = io.BytesIO()
    Image.fromarray(((clip[:, 5].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(image, format="PNG")
    media["still.png"] = image.getvalue()
    return media


@pytest.fixture(scope="module")
def decoder() -> DaliDecoder:
    return DaliDecoder(DaliDecodeConfig(device="cpu", max_batch_size=4))


def frame_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Fa, Fb) mean absolute difference between every frame of clip ``a`` and of clip ``b``."""
    return (a.permute(1, 0, 2, 3)[:, None] - b.permute(1, 0, 2, 3)[None]).abs().mean(dim=(2, 3, 4))


def assert_matches_pyav(decode: DaliDecoder, data: bytes, name: str, frames: int, height: int, width: int,
                        fps: float | None) -> None:
    """Within tolerance of PyAV's output, and made of the same source frames."""
    expected = decode_clip(data, name, frames, height, width, fps)
    got = decode(data, name, frames, height, width, fps).cpu()
    assert got.shape == expected.shape == (3, frames, height, width) and got.dtype == torch.float32
    difference = (got - expected).abs()
    assert difference.mean() < MEAN_TOLERANCE and difference.flatten().quantile(0.99) < P99_TOLERANCE

    every_frame = decode_clip(data, name, SOURCE_FRAMES, height, width)
    distances = frame_distances(got, every_frame)  # (frames, SOURCE_FRAMES)
    wanted = frame_indices(SOURCE_FPS, frames, fps)
    assert distances.argmin(dim=1).tolist() == wanted, "DALI picked other source frames than PyAV"
    others = distances.clone()
    others[range(frames), wanted] = float("inf")
    assert (distances[range(frames), wanted] * 4 < others.min(dim=1).values).all(), "frames too alike to tell apart"


SHAPES = [
    (9, 48, 48, 10.0),  # 24 -> 10 fps: source frames 0, 2, 5, 7, 10, ...; square crop of a wide frame
    (17, 72, 128, None),  # the source size and rate
    (5, 100, 90, None),  # upscaling, tall crop
]


@pytest.mark.parametrize("frames, height, width, fps", SHAPES)
def test_dali_cpu_matches_pyav_on_the_same_frames(media, decoder, frames, height, width, fps):
    assert_matches_pyav(decoder, media["vp9.mp4"], "vp9.mp4", frames, height, width, fps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's GPU decoder (NVDEC) needs a CUDA GPU")
@pytest.mark.parametrize("frames, height, width, fps", SHAPES)
def test_dali_gpu_decodes_h264_like_pyav(media, frames, height, width, fps):
    gpu = DaliDecoder(DaliDecodeConfig(device="gpu"))
    assert gpu(media["h264.mp4"], "h264.mp4", 5, 32, 32).is_cuda
    assert_matches_pyav(gpu, media["h264.mp4"], "h264.mp4", frames, height, width, fps)


def test_image_matches_pyav_backend(media, decoder):
    expected = decode_clip(media["still.png"], "still.png", 9, 40, 40)
    got = decoder(media["still.png"], "still.png", 9, 40, 40)
    assert got.shape == expected.shape == (3, 1, 40, 40)
    assert (got - expected).abs().mean() < MEAN_TOLERANCE


def test_h264_refused_by_cpu_decoder_with_file_and_codec(media, decoder):
    with pytest.raises(MediaError, match=r"h264\.mp4: codec h264 cannot be decoded by DALI on the cpu"):
        decoder(media["h264.mp4"], "h264.mp4", 9, 32, 32)


def zero_first_frame(data: bytes) -> bytes:
    """A file whose container reads fine but whose first coded frame is zeros: only the decoder fails."""
    with av.open(io.BytesIO(data)) as container:
        packet = next(p for p in container.demux(video=0) if p.size)
        position, size = packet.pos, packet.size
    return data[:position] + bytes(size) + data[position + size:]


def test_bad_files_give_media_errors_and_spare_the_rest_of_the_batch(media, decoder):
    good = media["vp9.mp4"]
    requests = [ClipRequest(good, "good.mp4", 9, 32, 32, 12.0),
                ClipRequest(zero_first_frame(good), "corrupt.mp4", 9, 32, 32, 12.0),
                ClipRequest(good[: len(good) // 2], "truncated.mp4", 9, 32, 32),
                ClipRequest(b"not a video\n" * 40, "notes.mp4", 9, 32, 32),
                ClipRequest(good, "short.mp4", 33, 32, 32),
                ClipRequest(good, "again.mp4", 5, 32, 32)]
    results = decoder.decode_batch(requests)
    for request, result in zip(requests[1:5], results[1:5]):
        assert isinstance(result, MediaError) and str(result).startswith(request.name + ":"), result
    assert "DALI could not decode it" in str(results[1])
    assert "24 frames" in str(results[4]) and "frame 32 needed" in str(results[4])
    torch.testing.assert_close(results[0], decoder(good, "good.mp4", 9, 32, 32, 12.0), atol=0, rtol=0)
    assert (results[5] - decode_clip(good, "again.mp4", 5, 32, 32)).abs().mean() < MEAN_TOLERANCE
    with pytest.raises(MediaError, match="corrupt.mp4"):
        decoder(requests[1].data, "corrupt.mp4", 9, 32, 32)


def test_backend_selector(media, monkeypatch):
    assert decode_backend("pyav") is decode_clip
    dali = decode_backend("dali", device="cpu")
    copy = pickle.loads(pickle.dumps(dali))  # what a loader hands its worker processes
    clip = media["vp9.mp4"]
    torch.testing.assert_close(copy(clip, "vp9.mp4", 5, 32, 32), dali(clip, "vp9.mp4", 5, 32, 32), atol=0, rtol=0)
    with pytest.raises(ValueError, match="--decode-backend 'nvdec'"):
        decode_backend("nvdec")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    with pytest.raises(ImportError, match=r"data\.decode_backend dali needs NVIDIA DALI.*nvidia-dali-cuda130"):
        decode_backend("dali", flag="data.decode_backend")


def test_bench_tool_reports_each_backend(tmp_path):
    from benchmarks import dataloader as bench_dataloader

    size = ["--frames", "5", "--height", "32", "--width", "32", "--fps", "12", "--batch-size", "2", "--workers", "0"]
    rows = bench_dataloader.main(
        ["--synthetic", "2", "--codec", "vp9", "--synthetic-dir", str(tmp_path / "media"), "--synthetic-size", "64x48",
         "--synthetic-frames", "12", "--clips", "4", "--steps", "2", "--step-ms", "10", "--dali-device", "cpu",
         "--output", str(tmp_path / "bench.json"), *size])
    assert [row["backend"] for row in rows] == ["pyav", "dali"]
    for row in rows:
        assert row["clips"] == 4 and row["errors"] == 0 and row["clips_per_s"] > 0
        assert row["frames_per_s"] == pytest.approx(row["clips_per_s"] * 5, rel=0.01)
        assert 0 <= row["wait_share"] <= 1
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows

    shards = tmp_path / "shards"  # the same clips as a make_shards-style tar, beside a caption record
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for number, clip in enumerate(sorted((tmp_path / "media").glob("*.mp4"))):
            tar.add(clip, arcname=f"{number:04d}.mp4")
            record = json.dumps({"caption": "texture"}).encode()
            member = tarfile.TarInfo(f"{number:04d}.json")
            member.size = len(record)
            tar.addfile(member, io.BytesIO(record))
    rows = bench_dataloader.main(["--input", str(shards), "--backends", "dali", "--dali-device", "cpu",
                                  "--clips", "6", "--step-ms", "0", *size])
    assert len(rows) == 1 and rows[0]["clips"] == 6 and rows[0]["errors"] == 0 and rows[0]["wait_share"] is None


def test_shard_loader_decodes_with_dali_like_pyav(tmp_path):
    """``data.shards.decode_backend=dali`` feeds training the same micro-batches as PyAV (VP9 clips,
    DALI's CPU decoder here; NVDEC on a GPU), within the decoders' colour-conversion tolerance."""
    from megatron_mfm.data.shards.stages import StageConfig
    from megatron_mfm.data.shards.streaming import ShardDataConfig, ShardLoader
    from megatron_mfm.tasks.mixture import TaskMixtureConfig

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(2):
        write_mp4(raw / f"clip{i}.mp4", distinct_frames(SOURCE_FRAMES, 72, 128).roll(i, dims=1), fps=SOURCE_FPS,
                  codec="libvpx-vp9")
        (raw / f"clip{i}.txt").write_text(f"scrambled reds {i}")
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_shards.py"), "--input", str(raw), "--output",
                    str(shards), "--workers", "1", "--min-frames", "17", "--min-side", "64"], check=True,
                   capture_output=True, timeout=300)
    batches = {}
    for backend in ("pyav", "dali"):
        config = ShardDataConfig(path=str(shards), fps=12, workers=0, prefetch_steps=0, decode_backend=backend)
        loader = ShardLoader(config, [StageConfig(resolutions=[[48, 80]], frames=[9])], TaskMixtureConfig(),
                             micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=1, seed=5)
        batches[backend] = loader.next_global_batch()
    for pyav, dali in zip(batches["pyav"], batches["dali"]):
        assert pyav.tasks == dali.tasks and torch.equal(pyav.sample_ids, dali.sample_ids)
        error = (pyav.pixels - dali.pixels).abs()
        assert error.mean() < MEAN_TOLERANCE and error.flatten().quantile(0.99) < P99_TOLERANCE
