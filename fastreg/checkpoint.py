"""Checkpoints: written atomically, found again after a crash, checked against the running config.

A checkpoint is `ckpt_epoch<NNNN>.pt` after NNNN complete epochs, or `ckpt_epoch<NNNN>_step<SSSSSSSS>.pt`
at global step S inside the next epoch (trainer.checkpoint_every). It is written to a temporary file,
fsynced, then renamed: a file with the final name is always complete, and a crash mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"ckpt_epoch(\d{4,})(?:_step(\d{8,}))?\.pt$")


def git_commit() -> str:
    """The source tree's commit, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=src, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_path(out_dir: Path, epoch: int, step: Optional[int] = None) -> Path:
    """`epoch` complete epochs; `step`: the global step of a save inside the next epoch."""
    inside = f"_step{step:08d}" if step is not None else ""
    return out_dir / f"ckpt_epoch{epoch:04d}{inside}.pt"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary files never match). An epoch's end comes
    before the saves inside the following epoch: (epoch, -1) < (epoch, step)."""
    found = [((int(m.group(1)), int(m.group(2) or -1)), p) for p in out_dir.glob("ckpt_epoch*.pt")
             if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def prune(out_dir: Path, keep: int) -> None:
    """Keep the newest `keep` epoch-end checkpoints (0: keep everything), and the newest `keep` saves inside
    the epoch after them: saves inside an epoch never push out the epoch ends, which a resume with other
    settings needs, and they go once their epoch has ended."""
    if keep <= 0:
        return
    found = list_checkpoints(out_dir)
    ends = [p for p in found if not is_inside_epoch(p)]
    newest_end = found.index(ends[-1]) if ends else -1
    inside_done = [p for i, p in enumerate(found) if is_inside_epoch(p) and i < newest_end]
    inside_now = [p for i, p in enumerate(found) if is_inside_epoch(p) and i > newest_end]
    for old in ends[:-keep] + inside_done + inside_now[:-keep]:
        old.unlink()


def is_inside_epoch(path: Path) -> bool:
    return CKPT_RE.search(path.name).group(2) is not None


def load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it or pass "
                           "trainer.resume=<an older checkpoint>") from e


def find_resume(resume: str, out_dir: Path) -> Optional[Path]:
    """trainer.resume: 'none', 'auto' (newest complete checkpoint in out_dir, if any) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    return Path(resume)


# Keys whose change makes a checkpoint unusable: its tensors would not fit the model being built.
STRUCTURAL_KEYS = ("student", "teachers", "head", "loss")


def compare_configs(saved: dict, current: dict, path: Path) -> None:
    """Fail when the model differs from the checkpoint's; log every other difference."""
    for key in STRUCTURAL_KEYS:
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"checkpoint {path} was written with {key}={saved.get(key)} but this run has {key}={current.get(key)}; "
                "resume with the same config, or start a fresh run with trainer.resume=none or another trainer.out_dir"
            )
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        log.warning("resuming from %s with changed settings: %s", path, ", ".join(changed))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    # The uint32 key as int64: torch 2.14 cannot pickle uint32 tensors, and ranks gather this by pickling.
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
