"""Directories that appear complete or not at all: write into a temp sibling, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` on success.

    An existing ``target`` is refused (never half-overwritten); on error the temp dir is removed.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose a new path or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` and every folder of it to disk (before it is published)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name, os.O_RDONLY)
        fsync_dir(folder)


def fsync_dir(folder: str | Path) -> None:
    """Make renames and new entries in ``folder`` durable."""
    _fsync(Path(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_disk_full(error: BaseException) -> bool:
    """Whether a write failed for lack of space (torch's zip writer reports only "unexpected pos")."""
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        text in str(error) for text in ("No space left", "unexpected pos", "file write failed"))
