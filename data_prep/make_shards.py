#!/usr/bin/env python3
"""Raw videos and images with captions -> webdataset tar shards + an index and a report.

Inputs: a folder (media files, each with a caption in a sibling ``NAME.txt``) or a manifest
(CSV with columns path,caption[,...] or JSONL with "path" and "caption"; extra fields are kept as
metadata). Every file is probed by decoding it (PyAV / Pillow) in parallel workers; files that
fail, or fail the filters, are skipped and listed in ``report.json``, never fatal.

Shards hold each sample's media bytes as they are (``KEY.mp4``/``KEY.jpg``...) and ``KEY.json``
(caption, metadata, probe); beside each shard, ``shard-XXXXXX.json`` catalogs its samples' byte
offsets and probed sizes, so the training loader plans batches without opening the tars. The assignment of samples to shards is a pure function of the
inputs and ``--shard-size-mb``; each shard is written to a temporary name and renamed, so a
re-run skips finished shards and redoes only missing ones.

  python data_prep/make_shards.py --input videos/ --output shards/ --shard-size-mb 1024 --workers 16
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm


from megatron_mfm.data.shards.catalog import INDEX, catalog_path, write_catalog
from megatron_mfm.data.decode.pyav import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, MediaInfo, probe
from megatron_mfm.utils.atomic import atomic_write_text

REPORT = "report.json"


def list_inputs(source: Path) -> list[dict]:
    """Samples as {path, caption, metadata} from a folder or a CSV/JSONL manifest."""
    if source.is_dir():
        samples = []
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                caption = path.with_suffix(".txt")
                samples.append({"path": str(path), "caption": caption.read_text().strip() if caption.exists() else "",
                                "metadata": {}})
        return samples
    if source.suffix == ".jsonl":
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    elif source.suffix == ".csv":
        with open(source, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise SystemExit(f"--input {source}: expected a folder, a .csv or a .jsonl manifest")
    samples = []
    for number, row in enumerate(rows, 1):
        if "path" not in row:
            raise SystemExit(f"--input {source}: row {number} has no 'path'")
        path = Path(row["path"])
        path = path if path.is_absolute() else source.parent / path
        metadata = {k: v for k, v in row.items() if k not in ("path", "caption")}
        samples.append({"path": str(path), "caption": row.get("caption", ""), "metadata": metadata})
    return samples


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


def bucket_of(info: MediaInfo) -> str:
    """A coarse resolution/aspect/kind label for the index totals."""
    short = min(info.width, info.height)
    tier = next((t for t in (2160, 1080, 720, 480, 360, 240) if short >= t), 0)
    aspect = "landscape" if info.width > info.height * 1.1 else "portrait" if info.height > info.width * 1.1 else "square"
    return f"{info.kind}/{tier}p/{aspect}"


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
    skipped = []
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        probes = dict(tqdm(pool.map(probe_worker, [s["path"] for s in samples], chunksize=8),
                           total=len(samples), desc="probing", unit="file"))
    kept = []
    for sample in samples:
        info, error = probes[sample["path"]]
        if error is None:
            error = filter_reason(MediaInfo(**info), args)
        if error is not None:
            skipped.append({"path": sample["path"], "reason": error})
            continue
        key = hashlib.sha1(sample["path"].encode()).hexdigest()[:16]
        kept.append({**sample, "probe": info, "key": key, "bytes": Path(sample["path"]).stat().st_size})

    shards = plan_shards(kept, int(args.shard_size_mb * 2**20))
    written = 0
    for number, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard")):
        path = args.output / f"shard-{number:06d}.tar"
        if not path.exists():  # finished shards of an earlier run are kept
            write_shard(path, shard)
            written += 1
        elif not catalog_path(path).exists():  # interrupted between the shard and its catalog
            write_catalog(path)
    buckets: dict[str, int] = {}
    for sample in kept:
        label = bucket_of(MediaInfo(**sample["probe"]))
        buckets[label] = buckets.get(label, 0) + 1
    index = {
        "shards": [{"name": f"shard-{n:06d}.tar", "samples": len(s)} for n, s in enumerate(shards)],
        "samples": len(kept),
        "buckets": dict(sorted(buckets.items())),
        "frames": sum(s["probe"]["frames"] for s in kept),
    }
    atomic_write_text(args.output / INDEX, json.dumps(index, indent=2) + "\n")
    atomic_write_text(args.output / REPORT, json.dumps({"skipped": skipped, "kept": len(kept)}, indent=2) + "\n")
    print(f"{len(kept)} samples in {len(shards)} shards ({written} written now), {len(skipped)} skipped "
          f"(see {args.output / REPORT})")
    return index


if __name__ == "__main__":
    main()
