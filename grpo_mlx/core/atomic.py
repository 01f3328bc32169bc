"""The one atomic write: a file is written under a temporary name, flushed, then renamed over its path,
so a reader (or a resumed run) sees the old file or the new one, never half of one. No MLX."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(name: str) -> str:
    """The hidden name `atomic_write` writes `name` under first (its suffix kept: mx.save_safetensors wants it)."""
    return f".{name}.tmp{Path(name).suffix}"


def atomic_write(path: Path, writer) -> None:
    """Call writer(tmp_path), fsync it, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(tmp_name(path.name))
    try:
        writer(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync(path.parent)
