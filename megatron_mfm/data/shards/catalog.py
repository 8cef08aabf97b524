"""Where every sample of a shard directory lives, and what the planner needs to bucket it.

The loader plans batches from metadata alone (kind, size, frames, fps) and then reads only the
bytes of the samples this rank trains on, by offset. ``make_shards.py`` writes the catalog of
each shard next to it (``shard-000000.json``); shards without one are scanned (tar headers and
the small JSON records only), so older shard sets keep working.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from megatron_mfm.utils.atomic import atomic_write_text

INDEX = "index.json"


@dataclass(frozen=True)
class SampleEntry:
    """One sample: its members' byte ranges in the shard and its probed media facts."""

    shard: str
    key: str
    media_name: str
    media_offset: int
    media_size: int
    record_offset: int
    record_size: int
    kind: str
    """image or video"""
    width: int
    height: int
    frames: int
    fps: float

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    def duration_frames(self, fps: float) -> int:
        """Frames available when resampled to ``fps`` (never more than the file has)."""
        if self.is_image or not self.fps:
            return self.frames
        return min(self.frames, int(self.frames * min(fps / self.fps, 1.0) + 1e-6))


def catalog_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def scan_shard(shard: Path) -> list[SampleEntry]:
    """Catalog one tar shard by reading its headers and JSON records."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    entries = []
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            parts = members.setdefault(key, {})
            parts["json" if ext == "json" else "media"] = member
            if len(parts) < 2:
                continue
            del members[key]
            record = json.loads(tar.extractfile(parts["json"]).read())
            probe, media = record["probe"], parts["media"]
            entries.append(SampleEntry(
                shard=shard.name, key=key, media_name=media.name, media_offset=media.offset_data,
                media_size=media.size, record_offset=parts["json"].offset_data, record_size=parts["json"].size,
                kind=probe["kind"], width=int(probe["width"]), height=int(probe["height"]),
                frames=int(probe["frames"]), fps=float(probe["fps"] or 0.0),
            ))
    return entries


def write_catalog(shard: Path) -> None:
    """Write ``shard``'s catalog next to it (atomically)."""
    atomic_write_text(catalog_path(shard), json.dumps([asdict(e) for e in scan_shard(shard)]) + "\n")


def shard_entries(shard: Path) -> list[SampleEntry]:
    """The samples of one shard: from its catalog, else by scanning the tar."""
    catalog = catalog_path(shard)
    return [SampleEntry(**e) for e in json.loads(catalog.read_text())] if catalog.is_file() else scan_shard(shard)


def load_catalog(directory: str | Path) -> list[SampleEntry]:
    """Every sample of a shard directory, in index order (shard by shard)."""
    directory = Path(directory)
    index_file = directory / INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file}: no shard index (write shards with data_prep/make_shards.py)")
    shards = json.loads(index_file.read_text())["shards"]
    entries: list[SampleEntry] = []
    for shard in tqdm(shards, desc="reading shard catalogs", unit="shard", disable=len(shards) < 64):
        path = directory / shard["name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index_file} but missing")
        found = shard_entries(path)
        if len(found) != shard["samples"]:
            raise ValueError(f"{path}: {len(found)} samples, {index_file} says {shard['samples']}")
        entries.extend(found)
    return entries


def read_sample(directory: str | Path, entry: SampleEntry) -> tuple[bytes, dict]:
    """The media bytes and JSON record of one sample, read by offset."""
    with open(Path(directory) / entry.shard, "rb") as shard:
        shard.seek(entry.media_offset)
        media = shard.read(entry.media_size)
        shard.seek(entry.record_offset)
        record = json.loads(shard.read(entry.record_size))
    if len(media) != entry.media_size:
        raise ValueError(f"{entry.shard}: sample {entry.key} truncated ({len(media)} of {entry.media_size} bytes)")
    return media, record
