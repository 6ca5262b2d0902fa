"""Files that are whole or absent, and where fastreg keeps its caches.

No torch here: `python -m fastreg.index` imports this module and should start in a fraction of a second.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def cache_dir(kind: str) -> Path:
    """Where fastreg caches `kind` (index, demo, features): $FASTREG_CACHE/<kind> when it is set, else
    <cache home>/fastreg/<kind>, the cache home being $XDG_CACHE_HOME or ~/.cache (the XDG base directory rule,
    which desktop and cluster setups use to move caches off a small home directory)."""
    if os.environ.get("FASTREG_CACHE"):
        return Path(os.environ["FASTREG_CACHE"]).expanduser() / kind
    home = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(home).expanduser() / "fastreg" / kind


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`path` holds either its old content or all that write(file) wrote, never part of it: the bytes go to a
    temporary file, are fsynced, then renamed over `path`. A write that fails, or is interrupted, removes its
    temporary file: a failed write leaves the directory as it found it."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error, or an interrupt: either way the partial file must go
        tmp.unlink(missing_ok=True)
        raise
    sync(path.parent)  # make the rename itself durable


def temporary_path(path: Path) -> Path:
    """Where atomic_write puts `path`'s bytes until the rename (fastreg.checkpoint.remove_partial_saves finds
    them by this name)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def sync(path: Path) -> None:
    """fsync a file's bytes, or a directory's entries (which a rename or a new file changes), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
