"""Files that are whole or absent, and where fastreg keeps its caches.

No torch here: `python -m fastreg.index` imports this module and should start in a fraction of a second.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fastreg.preemption import cleaned_up


def cache_dir(kind: str) -> Path:
    """Where fastreg caches `kind` (index, demo, features): $FASTREG_CACHE/<kind> when it is set, else
    <cache home>/fastreg/<kind>, the cache home being $XDG_CACHE_HOME or ~/.cache (the XDG base directory rule,
    which desktop and cluster setups use to move caches off a small home directory)."""
    if os.environ.get("FASTREG_CACHE"):
        return Path(os.environ["FASTREG_CACHE"]).expanduser() / kind
    home = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(home).expanduser() / "fastreg" / kind


# What each cache folder holds, for messages.
CACHED = {
    "index": "the dataset indexes",
    "demo": "the demo's data and teacher",
    "features": "fastreg.eval's cached features",
}


def cache_folder(kind: str, given: str | os.PathLike | None = None) -> Path:
    """cache_dir(kind), or the folder `given` on a command line (--cache-dir), created and checked writable:
    called before any work whose result goes there. Raises OSError naming the variable that put it there and
    the fix."""
    path = Path(given).expanduser() if given is not None else cache_dir(kind)
    try:
        make_writable_dir(path)
    except OSError as e:
        origin = f"--cache-dir={given}" if given is not None else cache_origin()
        fix = "pass a writable --cache-dir" if given is not None else "export FASTREG_CACHE=<a writable folder>"
        raise OSError(
            e.errno,
            f"{origin}: the folder {path}, where fastreg keeps {CACHED[kind]}, is not a writable directory "
            f"({e.strerror}); {fix}, or fix its permissions",
        ) from e
    return path


def cache_origin() -> str:
    """The setting that puts fastreg's caches where cache_dir says, for messages."""
    if os.environ.get("FASTREG_CACHE"):
        return f"FASTREG_CACHE={os.environ['FASTREG_CACHE']}"
    if os.environ.get("XDG_CACHE_HOME"):
        return f"XDG_CACHE_HOME={os.environ['XDG_CACHE_HOME']} (FASTREG_CACHE is not set)"
    return "~/.cache (FASTREG_CACHE and XDG_CACHE_HOME are not set)"


def make_writable_dir(path: Path) -> None:
    """Create `path` and write a file there, raising the OSError if either fails: checked before the work
    whose files go there. The file is unnamed (O_TMPFILE where the system has it): nothing is left behind."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`path` holds either its old content or all that write(file) wrote, never part of it: the bytes go to a
    temporary file, are fsynced, then renamed over `path`. A write that fails, or is interrupted, removes its
    temporary file: a failed write leaves the directory as it found it."""
    tmp = temporary_path(path)
    with cleaned_up(lambda: tmp.unlink(missing_ok=True)):  # an error or a stop signal; after the rename, nothing
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
