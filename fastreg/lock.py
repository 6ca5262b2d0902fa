"""One writer of a folder at a time, across processes and their deaths. No torch here: a lock is taken before
anything heavy starts."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastreg.preemption import cleaned_up

log = logging.getLogger(__name__)


@contextmanager
def writer_lock(out: Path, writer: str) -> Iterator[None]:
    """One writer of `out` at a time: an exclusive flock on OUT.lock, which names its holder (pid and host).

    The kernel drops a flock when its process ends, however it ends. A lock file whose flock is free was
    therefore left by a writer that died (killed before it could remove it), and is taken over with a warning.
    A second writer while the first runs is refused, naming `writer` and the holder: two cache_teacher runs used to
    write into one OUT.partial, and both "succeeded" with a cache of zero rows."""
    path = out.with_name(out.name + ".lock")
    fd = locked(path, out, writer)
    try:
        with cleaned_up(lambda: path.unlink(missing_ok=True)):  # a stop signal too (fastreg.preemption.stop_now)
            left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if left:
                log.warning("%s: taking over the lock of a writer that died (%s) before it removed it", path, left)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
    finally:
        os.close(fd)


def locked(path: Path, out: Path, writer: str) -> int:
    """A descriptor of the file at `path`, holding its exclusive flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "starting"
            os.close(fd)
            raise BlockingIOError(
                f"{out} is being written by another {writer} ({holder}), which holds {path}: wait for it to "
                "finish, or write another folder"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed that file as it finished, after this process opened it: lock anew
