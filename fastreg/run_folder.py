"""A run folder (trainer.out_dir, runs/<name> by default) and its rule: the folder holds one run, the one whose
config its checkpoints carry.

    ckpt_epoch0002.pt, ckpt_epoch0003_step00001200.pt   the run's saves (fastreg.checkpoint)
    train.log, metrics.jsonl, tb/                       its record (fastreg.run_log)
    curves.png, results.md                              its curves (fastreg.plot) and the demo's table
    previous/<UTC time>/                                files of earlier runs, moved aside, never deleted

- trainer.resume=auto continues the newest readable checkpoint, under the same config: compare_configs
  (fastreg.checkpoint) refuses another one before anything in the folder changes, naming the keys and the ways out.
  A finished run resumes at its end, with nothing to train.
- A run that starts afresh here (trainer.resume=none; auto with no checkpoint yet; a checkpoint from another
  folder) first moves the earlier run's files into previous/<UTC time>/: nothing is deleted, nothing of two runs
  mixes, and pruning sees this run's checkpoints only.
- A run that resumes from a checkpoint older than others here (trainer.resume=<out_dir>/ckpt_...pt, or auto past an
  unreadable newer one) moves the newer ones there, with a copy of metrics.jsonl: they are another continuation,
  which this run's saves would replace and a later trainer.resume=auto would pick.
- Pruning never removes the checkpoint just written, nor one newer than it (fastreg.checkpoint.prune).

No torch here: fastreg.train reads the folder to say what the same command does next when a stop signal ends it
outside the training loop, possibly while torch is being imported.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from pathlib import Path

from fastreg.files import atomic_write, sync

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"ckpt_epoch(\d{4,})(?:_step(\d{8,}))?\.pt$")
# a run's files besides its checkpoints: curves.png drawn from metrics.jsonl (fastreg.plot), results.md the demo's
RECORD = ("train.log", "metrics.jsonl", "tb", "curves.png", "results.md")
PREVIOUS = "previous"


def checkpoint_path(out_dir: Path, epoch: int, step: int | None = None) -> Path:
    """`epoch` complete epochs; `step`: the global step of a save inside the next epoch."""
    inside = f"_step{step:08d}" if step is not None else ""
    return out_dir / f"ckpt_epoch{epoch:04d}{inside}.pt"


def position(path: Path) -> tuple[int, int]:
    """(epochs done, global step or -1 at an epoch's end) of a checkpoint's name: the order of a run's saves. An
    epoch's end comes before the saves inside the following epoch: (epoch, -1) < (epoch, step)."""
    m = CKPT_RE.search(path.name)
    return int(m.group(1)), int(m.group(2) or -1)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary files never match)."""
    return sorted((p for p in out_dir.glob("ckpt_epoch*.pt") if CKPT_RE.search(p.name)), key=position)


def is_inside_epoch(path: Path) -> bool:
    return position(path)[1] >= 0


def not_continued(out_dir: Path, resumed: Path | None) -> tuple[list[Path], bool]:
    """The files of out_dir that a run resuming from `resumed` (None: starting afresh) does not continue, and
    whether metrics.jsonl is copied with them (it stays, as the record up to `resumed`). A checkpoint of this folder
    continues the ones up to it; one from elsewhere, or none, continues nothing here."""
    found = list_checkpoints(out_dir)
    if resumed is not None and resumed.resolve().parent == out_dir.resolve() and CKPT_RE.search(resumed.name):
        newer = [p for p in found if position(p) > position(resumed)]
        return newer, bool(newer)
    return found + [out_dir / name for name in RECORD if (out_dir / name).exists()], False


def move_aside(out_dir: Path, resumed: Path | None) -> tuple[Path, list[str]] | None:
    """Move the files not_continued names into out_dir/previous/<UTC time>/ (renames within the folder: each file
    is in one place or the other, whole): (that folder, the names moved), or None when there was nothing to move.
    Rank 0 only, once the checkpoint to resume from is known and before this run writes anything there."""
    moved, copy_metrics = not_continued(out_dir, resumed)
    if not moved:
        return None
    aside = new_folder(out_dir / PREVIOUS, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    names = [p.name for p in moved]
    if copy_metrics and (out_dir / "metrics.jsonl").is_file():
        metrics = (out_dir / "metrics.jsonl").read_bytes()
        atomic_write(aside / "metrics.jsonl", lambda f: f.write(metrics))
        names.append("metrics.jsonl (a copy)")
    for path in moved:
        os.rename(path, aside / path.name)
    sync(out_dir)
    return aside, names


def new_folder(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3 ... when two runs start within the same second."""
    parent.mkdir(exist_ok=True)
    for n in itertools.count(1):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def next_run(out_dir: Path, resume: str, epochs: int) -> str:
    """What the same command does next, from what out_dir holds now: the end of a stop signal's message when the
    signal came outside the training loop's step boundaries, where nothing was saved at the stop."""
    if resume == "none":
        return "the same command starts over (trainer.resume=none)"
    if resume != "auto":
        return f"the same command resumes from {resume} (trainer.resume)"
    found = list_checkpoints(out_dir)
    if not found:
        return "nothing was saved yet: the same command starts over"
    if position(found[-1]) == (epochs, -1):
        return f"training is complete, saved in {found[-1]}: the same command resumes there, with nothing to train"
    return f"{found[-1]} is saved: the same command resumes from it"
