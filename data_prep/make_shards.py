#!/usr/bin/env python3
"""Raw videos and images with captions -> webdataset tar shards + an index and a report.

Inputs: a folder (media files, each with a caption in a sibling ``NAME.txt``) or a manifest
(CSV with columns path,caption[,...] or JSONL with "path" and "caption"; extra fields are kept as
metadata). Every file is probed by decoding it (PyAV / Pillow) in parallel workers; files that
fail, or fail the filters, are skipped and listed in ``report.json``, never fatal.

Shards hold each sample's media bytes as they are (``KEY.mp4``/``KEY.jpg``...) and ``KEY.json``
(caption, metadata, probe); beside each shard, ``shard-XXXXXX.json`` catalogs its samples' byte
offsets and probed sizes, so the training loader plans batches without opening the tars.

Each shard is written to a temporary name and renamed, and never changes once written (so
sidecars made from it stay valid). A re-run into the same ``--output`` keeps the finished shards
and writes the kept samples that no shard holds yet (new inputs, or an interrupted run's rest)
into new shards; ``index.json`` is rebuilt from the shards' catalogs, so it always matches them.

  python data_prep/make_shards.py --input videos/ --output shards/ --shard-size-mb 1024 --workers 16
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from tqdm import tqdm


from megatron_mfm.data.shards.catalog import INDEX, SampleEntry, catalog_path, shard_entries, write_catalog
from megatron_mfm.data.decode.pyav import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, MediaInfo, probe
from megatron_mfm.utils.atomic import atomic_write_text

REPORT = "report.json"


def list_inputs(source: Path) -> list[dict]:
    """Samples as {path, caption, metadata} from a folder or a CSV/JSONL manifest."""
    if not source.exists():
        raise SystemExit(f"--input {source}: no such file or folder")
    if source.is_dir():
        samples = []
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                caption = path.with_suffix(".txt")
                samples.append({"path": str(path), "caption": caption.read_text().strip() if caption.exists() else "",
                                "metadata": {}})
        return samples
    samples = []
    for number, row in enumerate(read_manifest(source), 1):
        if "path" not in row:
            raise SystemExit(f"--input {source}: row {number} has no 'path'")
        path = Path(row["path"])
        path = path if path.is_absolute() else source.parent / path
        metadata = {k: v for k, v in row.items() if k not in ("path", "caption")}
        samples.append({"path": str(path), "caption": row.get("caption", ""), "metadata": metadata})
    return samples


def read_manifest(source: Path) -> list[dict]:
    """The rows of a CSV or JSONL manifest; a malformed line is named."""
    if source.suffix == ".csv":
        with open(source, newline="") as handle:
            return list(csv.DictReader(handle))
    if source.suffix != ".jsonl":
        raise SystemExit(f"--input {source}: expected a folder, a .csv or a .jsonl manifest")
    rows = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as error:
            raise SystemExit(f"--input {source}: line {number} is not JSON ({error})") from None
        if row is not None and not isinstance(row, dict):
            raise SystemExit(f"--input {source}: line {number} is not a JSON object")
        rows += [row] if row is not None else []
    return rows


def probe_worker(path: str) -> tuple[str, tuple[dict | None, str | None]]:
    """Runs in a worker process: path -> (path, (probe as dict, None) or (None, error))."""
    try:
        return path, (asdict(probe(Path(path).read_bytes(), path)), None)
    except (OSError, MediaError) as error:
        return path, (None, str(error))


def filter_reason(info: MediaInfo, args: argparse.Namespace) -> str | None:
    """Why a probed sample is filtered out, or None."""
    if info.kind == "video" and info.frames < args.min_frames:
        return f"{info.frames} frames < --min-frames {args.min_frames}"
    if min(info.width, info.height) < args.min_side:
        return f"shorter side {min(info.width, info.height)} < --min-side {args.min_side}"
    aspect = max(info.width, info.height) / max(1, min(info.width, info.height))
    if aspect > args.max_aspect:
        return f"aspect {aspect:.2f} > --max-aspect {args.max_aspect}"
    return None


def bucket_of(kind: str, width: int, height: int) -> str:
    """A coarse resolution/aspect/kind label for the index totals."""
    short = min(width, height)
    tier = next((t for t in (2160, 1080, 720, 480, 360, 240) if short >= t), 0)
    aspect = "landscape" if width > height * 1.1 else "portrait" if height > width * 1.1 else "square"
    return f"{kind}/{tier}p/{aspect}"


def plan_shards(samples: list[dict], shard_bytes: int) -> list[list[dict]]:
    """Consecutive samples grouped until a shard reaches ``shard_bytes``."""
    shards, current, size = [], [], 0
    for sample in samples:
        if current and size + sample["bytes"] > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(sample)
        size += sample["bytes"]
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, samples: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for sample in samples:
            media = Path(sample["path"])
            record = {"caption": sample["caption"], "metadata": sample["metadata"], "probe": sample["probe"],
                      "source": sample["path"]}
            for name, payload in ((f"{sample['key']}{media.suffix.lower()}", media.read_bytes()),
                                  (f"{sample['key']}.json", json.dumps(record).encode())):
                member = tarfile.TarInfo(name)
                member.size, member.mtime = len(payload), 0
                tar.addfile(member, io.BytesIO(payload))
    os.replace(tmp, path)
    write_catalog(path)


def probe_and_filter(samples: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(kept samples with probe, key and size; skipped files with the reason)."""
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        probes = dict(tqdm(pool.map(probe_worker, [s["path"] for s in samples], chunksize=8),
                           total=len(samples), desc="probing", unit="file"))
    kept, skipped = [], []
    for sample in samples:
        info, error = probes[sample["path"]]
        if error is None:
            error = filter_reason(MediaInfo(**info), args)
        if error is not None:
            skipped.append({"path": sample["path"], "reason": error})
            continue
        key = hashlib.sha1(sample["path"].encode()).hexdigest()[:16]
        kept.append({**sample, "probe": info, "key": key, "bytes": Path(sample["path"]).stat().st_size})
    return kept, skipped


def finished_shards(output: Path) -> dict[str, list[SampleEntry]]:
    """The samples of every shard an earlier run finished (catalogued now if it was interrupted
    between the shard and its catalog); leftovers of interrupted writes are removed."""
    for leftover in output.glob("shard-*.tar.tmp"):
        leftover.unlink()
    shards = {}
    for path in sorted(output.glob("shard-*.tar")):
        try:
            if not catalog_path(path).exists():
                write_catalog(path)
            shards[path.name] = shard_entries(path)
        except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"{path}: unreadable shard or catalog ({error}); remove both and re-run") from None
    return shards


def free_shard_numbers(shards: dict[str, list]) -> Iterator[int]:
    """Shard numbers not taken yet, lowest first (a deleted shard's number is reused)."""
    return (n for n in itertools.count() if f"shard-{n:06d}.tar" not in shards)


def shard_index(shards: dict[str, list[SampleEntry]]) -> dict:
    """index.json, from the shards' own catalogs."""
    entries = [entry for name in sorted(shards) for entry in shards[name]]
    buckets: dict[str, int] = {}
    for entry in entries:
        label = bucket_of(entry.kind, entry.width, entry.height)
        buckets[label] = buckets.get(label, 0) + 1
    return {
        "shards": [{"name": name, "samples": len(shards[name])} for name in sorted(shards)],
        "samples": len(entries),
        "buckets": dict(sorted(buckets.items())),
        "frames": sum(entry.frames for entry in entries),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="media folder or CSV/JSONL manifest")
    parser.add_argument("--output", required=True, type=Path, help="folder for shard-XXXXXX.tar, index.json, report.json")
    parser.add_argument("--shard-size-mb", type=float, default=1024.0, help="target media bytes per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel probing processes")
    parser.add_argument("--min-frames", type=int, default=17, help="shortest video kept (frames)")
    parser.add_argument("--min-side", type=int, default=256, help="smallest shorter side kept (pixels)")
    parser.add_argument("--max-aspect", type=float, default=3.0, help="largest long/short side ratio kept")
    args = parser.parse_args(argv)

    samples = list_inputs(args.input)
    args.output.mkdir(parents=True, exist_ok=True)
    kept, skipped = probe_and_filter(samples, args)
    shards = finished_shards(args.output)
    done = {entry.key for entries in shards.values() for entry in entries}
    new = [sample for sample in kept if sample["key"] not in done]
    numbers = free_shard_numbers(shards)
    planned = plan_shards(new, int(args.shard_size_mb * 2**20))
    for shard in tqdm(planned, desc="writing shards", unit="shard"):
        path = args.output / f"shard-{next(numbers):06d}.tar"
        write_shard(path, shard)
        shards[path.name] = shard_entries(path)
    index = shard_index(shards)
    atomic_write_text(args.output / INDEX, json.dumps(index, indent=2) + "\n")
    atomic_write_text(args.output / REPORT, json.dumps({"skipped": skipped, "kept": len(kept)}, indent=2) + "\n")
    stale = len(done - {sample["key"] for sample in kept})
    print(f"{index['samples']} samples in {len(shards)} shards ({len(planned)} written now), {len(skipped)} skipped "
          f"(see {args.output / REPORT})")
    if stale:
        print(f"note: {stale} samples of earlier shards are not among this run's kept inputs; they stay in the "
              f"shards (write to a new --output to leave them out)")
    return index


if __name__ == "__main__":
    main()
