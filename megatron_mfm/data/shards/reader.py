"""Reading the webdataset tar shards written by ``data_prep/make_shards.py``."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from megatron_mfm.data.decode.pyav import decode_clip
from megatron_mfm.tasks.builders import Clip


def iter_shard(path: str | Path) -> Iterator[tuple[str, str, bytes, dict]]:
    """(key, media member name, media bytes, json record) per sample, in shard order."""
    pending: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            entry = pending.setdefault(key, {})
            entry[ext] = (member.name, tar.extractfile(member).read())
            if "json" in entry and len(entry) == 2:
                (_, record), (name, media) = entry.pop("json"), next(iter(entry.values()))
                del pending[key]
                yield key, name, media, json.loads(record)


def clip_from_sample(key: str, name: str, media: bytes, record: dict, frames: int, height: int, width: int,
                     fps: float | None = None) -> Clip:
    """Decode one shard sample to a training ``Clip`` (PyAV on the CPU)."""
    is_image = record["probe"]["kind"] == "image"
    pixels = decode_clip(media, name, 1 if is_image else frames, height, width, fps)
    return Clip(pixels=pixels, caption=record["caption"], fps=fps or record["probe"]["fps"] or 16.0, key=key)
