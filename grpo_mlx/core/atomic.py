"""The one atomic write: a file is written under a temporary name, flushed, then renamed over its path,
so a reader (or a resumed run) sees the old file or the new one, never half of one. No MLX."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


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


def staging_folder(target: Path, label: str) -> Path:
    """A hidden folder beside `target` to build it in, renamed into place once whole; `label` names the
    target in the one-line error an unwritable place gives."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write {label} ({e.strerror or e}): choose a folder you can write to")
