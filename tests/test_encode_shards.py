"""data_prep/encode_shards.py over real shards (H.264 clips and a JPEG the test writes, plus one
corrupt sample) with tiny random CogVideoX VAE and T5 folders: sidecars hold exactly what the
encoders give for the decoded clip, ranks split the shards, re-runs resume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mfm.encoders.interface import build_encoders
from data_prep import encode_shards
from megatron_mfm.data.shards.reader import clip_from_sample, iter_shard
from megatron_mfm.tasks.builders import IMAGE_TASKS, VIDEO_TASKS, task_prompt
from megatron_mfm.utils.media import write_mp4
from tiny_pretrained import save_tiny_pretrained, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--frames", "9", "--height", "32", "--width", "48", "--fps", "12"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    media = tmp_path_factory.mktemp("media")
    for i in range(2):
        pixels = -torch.ones(3, 24, 64, 96)
        for f in range(24):
            pixels[i, f, 24:40, 4 * f:4 * f + 16] = 1  # a red (clip 0) or green (clip 1) square moving right
        write_mp4(media / f"clip{i}.mp4", pixels, fps=24)
        (media / f"clip{i}.txt").write_text(f"A square moving right, number {i}")
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(media / "still.jpg")
    (media / "still.txt").write_text("a grey picture")
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_shards.py"), "--input", str(media), "--output",
                    str(out), "--shard-size-mb", "0.002", "--workers", "1", "--min-frames", "17", "--min-side", "64"],
                   check=True, capture_output=True, timeout=300)
    last = sorted(out.glob("shard-*.tar"))[-1]
    record = {"caption": "broken", "metadata": {}, "probe": {"kind": "video", "fps": 24.0}, "source": "broken.mp4"}
    with tarfile.open(last, "a") as tar:  # a sample whose media bytes are not a video
        for name, payload in (("badc0ffee.mp4", b"not a video" * 40), ("badc0ffee.json", json.dumps(record).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), depth=False)


def run(shards: Path, output: Path, paths: dict[str, str], *extra: str) -> dict:
    return encode_shards.main(["--shards", str(shards), "--output", str(output), "--vae-path", paths["vae_path"],
                               "--text-encoder-path", paths["text_encoder_path"], "--tokenizer-path",
                               paths["tokenizer_path"], *SIZE, "--posterior", "mode", "--store-dtype", "float32",
                               "--dtype", "float32", "--device", "cpu", *extra])


def test_sidecars_equal_direct_encoding_split_over_ranks_and_resume(shards, paths, tmp_path):
    out = tmp_path / "encoded"
    inputs = sorted(p.name for p in shards.glob("shard-*.tar"))
    assert len(inputs) >= 2
    summaries = [run(shards, out, paths, "--rank", str(r), "--world-size", "2") for r in (0, 1)]
    assert [s["shards"] for s in summaries] == [len(inputs[0::2]), len(inputs[1::2])]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == inputs  # the two ranks cover every shard once
    assert sum(s["encoded"] for s in summaries) == 3
    corrupt = [c for s in summaries for c in s["corrupt"]]
    assert [c["key"] for c in corrupt] == ["badc0ffee"] and corrupt[0]["shard"] == inputs[-1]

    encoders = build_encoders(tiny_config(paths), None, torch.device("cpu"))
    checked = 0
    for name in inputs:
        with tarfile.open(out / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key, media_name, media, record in iter_shard(shards / name):
            if key == "badc0ffee":
                assert not any(m.startswith(key) for m in members)
                continue
            clip = clip_from_sample(key, media_name, media, record, 9, 32, 48, 12)
            latents = np.load(io.BytesIO(members[f"{key}.latents.npy"]))
            expected = encoders.encode_video(clip.pixels[None])[0].numpy()
            np.testing.assert_array_equal(latents, expected)
            text = np.load(io.BytesIO(members[f"{key}.text.npz"]))
            tasks = list(IMAGE_TASKS if clip.is_image else VIDEO_TASKS)
            prompts = [task_prompt(clip.caption, t, 12.0) for t in tasks]
            assert list(text["tasks"]) == tasks and list(text["prompts"]) == prompts
            states, mask = encoders.encode_text(prompts, torch.device("cpu"))
            np.testing.assert_array_equal(text["states"], states.numpy())
            np.testing.assert_array_equal(text["mask"], mask.numpy().astype(bool))
            checked += 1
    assert checked == 3

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / inputs[0]).unlink()
    again = run(shards, out, paths, "--rank", "0", "--world-size", "2")
    assert (again["written_now"], again["skipped_finished"]) == (1, len(inputs[0::2]) - 1)
    assert again["encoded"] == summaries[0]["encoded"] and again["corrupt"] == summaries[0]["corrupt"]
    for name in inputs[1:]:
        assert (out / name).stat().st_mtime_ns == stamps[name], f"{name} was finished and must not be redone"
    assert not list(out.glob(".*tmp*")), "no temporary files are left behind"
    summary_file = json.loads((out / "summary-rank00000.json").read_text())
    assert summary_file["encoded"] == again["encoded"]

    with pytest.raises(SystemExit, match="encode-settings.json.*frames"):
        run(shards, out, paths, "--rank", "0", "--world-size", "2", "--frames", "5")


def test_bad_arguments_are_named(shards, paths, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, tmp_path / "out", paths)
    assert f"--shards {tmp_path}: no shard-*.tar" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(shards, shards, paths)
    assert "--output must differ from --shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(shards, tmp_path / "out", paths, "--tasks", "t2v,dance")
    assert "--tasks: unknown ['dance']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vae_path='/nowhere/vae'"):
        run(shards, tmp_path / "out", {**paths, "vae_path": "/nowhere/vae"})
