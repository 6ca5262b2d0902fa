"""Checkpoints: written atomically, found again after a crash, checked against the running config.

A checkpoint is `ckpt_epoch<NNNN>.pt` after NNNN complete epochs, or `ckpt_epoch<NNNN>_step<SSSSSSSS>.pt`
at global step S inside the next epoch (trainer.checkpoint_every). It is written to a temporary file,
fsynced, then renamed: a file with the final name is always complete, and a crash mid-save leaves the
previous checkpoint intact (and a temporary file, removed at the next start). Older checkpoints are pruned
only after the new one is complete. A file with a final name that still cannot be read (a copy gone wrong,
a file system without atomic rename) is skipped by trainer.resume=auto, with a warning.

`read` is how fastreg reads every file torch.save wrote (checkpoints, teacher weights, exported students, cached
features): weights_only=True, the CRC-32s checked, and one error that says what is wrong with the file.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import logging
import os
import pickle
import random
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastreg.files import atomic_write, temporary_path
from fastreg.messages import listing
from fastreg.run_folder import checkpoint_path as checkpoint_path  # re-exported: the trainer and tests name saves
from fastreg.run_folder import is_inside_epoch, list_checkpoints

log = logging.getLogger(__name__)


def git_commit() -> str:
    """The source tree's commit, with '-dirty' when it has uncommitted changes; 'unknown' outside git. A copy of
    the tree without .git (benchmarks/gpu_check.sh on the GPU machine) names it in $FASTREG_COMMIT."""
    if os.environ.get("FASTREG_COMMIT"):
        return os.environ["FASTREG_COMMIT"]
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=src, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save(obj) through atomic_write; a full disk says which checkpoint is still there to resume from."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, temporary_path(path), e) from e
        raise


def disk_full(path: Path, tmp: Path, error: OSError) -> OSError:
    """The full disk, the file that was not written, and what is still there to resume from."""
    found = list_checkpoints(path.parent)
    if found:
        then = (
            f"the newest checkpoint there, {found[-1].name}, is intact. Free space on that disk (or lower "
            f"trainer.keep_checkpoints, or move trainer.out_dir), then run the same command again: it resumes "
            f"from {found[-1].name}"
        )
    else:
        then = "nothing else there was changed. Free space on that disk, then run the command again"
    return OSError(
        error.errno,
        f"the disk is full ({error.strerror}): {path} was not written, its partial file "
        f"{tmp.name} was removed, and {then}",
    )


def prune(out_dir: Path, keep: int, written: Path) -> None:
    """Keep the newest `keep` epoch-end checkpoints up to `written`, the one just saved (0: keep everything), and
    the newest `keep` saves inside the epoch after them: saves inside an epoch never push out the epoch ends,
    which a resume with other settings needs, and they go once their epoch has ended. `written` and any newer
    checkpoint stay whatever `keep` says: a newer one is not this run's to remove (fastreg.run_folder moves
    another run's files aside, but a checkpoint that trainer.resume=auto skipped as unreadable stays)."""
    if keep <= 0:
        return
    found = list_checkpoints(out_dir)
    found = found[: found.index(written) + 1]
    ends = [p for p in found if not is_inside_epoch(p)]
    newest_end = found.index(ends[-1]) if ends else -1
    inside_done = [p for i, p in enumerate(found) if is_inside_epoch(p) and i < newest_end]
    inside_now = [p for i, p in enumerate(found) if is_inside_epoch(p) and i > newest_end]
    for old in ends[:-keep] + inside_done + inside_now[:-keep]:
        old.unlink()


class UnreadableCheckpoint(ValueError):
    """A file that is there yet holds nothing torch.load(weights_only=True) reads: empty, text, cut short,
    damaged, or pickling code (a user's error: the command line prints its message, fastreg.train.USER_ERRORS)."""


def read(path: str | Path, what: str = "checkpoint", fix: str = "check the path", verdict: str | None = None) -> Any:
    """The object torch.save wrote to `path`, on the CPU, read with weights_only=True after its CRC-32s are
    checked: the one place fastreg reads a .pt or .pth file.

    weights_only=True reads tensors and plain containers only: unpickling anything else imports and calls code
    that the file names, so such a file is refused, never run. A missing file raises FileNotFoundError, any
    other failure UnreadableCheckpoint, saying what is wrong with the file (empty, text, cut short, damaged, or
    holding code) and what fixes that: '<what> <path> is empty (0 bytes): ...; fetch it again, or <fix>'.
    `what` names the file ("teacher checkpoint"), `fix` says what to do instead ("set teacher.checkpoint to
    ..."), and `verdict`, when given, comes first whatever the fault ("<what> <path> cannot be read: it is empty
    ..."), for callers that skip or report every unreadable file alike.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a file): {fix}")
    try:
        check_crcs(path)
        # DINO's full checkpoints pickle their argparse args next to the weights: a Namespace is plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, BadZipFile ... depending on what the file is
        fault = diagnose(path, e)
        if verdict:
            fault = f"{verdict}: it {fault}"
        raise UnreadableCheckpoint(f"{what} {path} {fault}, or {fix}") from e


def diagnose(path: Path, error: Exception) -> str:
    """What the file is, given why reading it failed, and what fixes that: empty, code to call (a GLOBAL that
    weights_only refuses), text, or damaged."""
    code = re.search(r"GLOBAL (\S+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if path.stat().st_size == 0:
        return "is empty (0 bytes): its download or copy failed; fetch it again"
    if code is not None:
        return (
            f"is refused: besides tensors it holds a Python object ({code.group(1)}) that loading would have to "
            "import and call, and unpickling such a file can run any code, so fastreg reads files with "
            "torch.load(weights_only=True) only. If you trust its source, convert it once in a trusted "
            "environment (torch.load(path, weights_only=False), then torch.save its state_dict alone)"
        )
    text = text_start(path)
    if text is not None:
        return (
            f"is a text file, not a PyTorch checkpoint (it begins {text!r}): a failed download saves its error "
            "page; fetch the file again"
        )
    return (
        f"is not a readable PyTorch checkpoint ({load_failure(error)}): the file is damaged, cut short or of "
        "another kind; fetch the file again"
    )


def text_start(path: Path) -> str | None:
    """The first line of a file that starts as text (an HTML error page, a Git LFS pointer), else None."""
    with open(path, "rb") as f:
        start = f.read(80)
    if b"PK\x03\x04".startswith(start[:4]):  # the start of a zip (torch.save's format) cut short, not text
        return None
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.splitlines()[0] if text.strip() and all(c.isprintable() or c.isspace() for c in text) else None


def load_failure(error: Exception) -> str:
    """The first sentence of why torch.load failed: torch wraps the cause in paragraphs of advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    cause = [line for line in lines if not line.startswith(boilerplate)] or lines or ["no message"]
    return f"{type(error).__name__}: {cause[0].split('. ', 1)[0]}"


RESUME_FIX = "pass trainer.resume=<another checkpoint> (or auto: the newest readable one in trainer.out_dir)"


def load(path: Path) -> dict:
    """A checkpoint to resume from; an unreadable one 'cannot be read', which the warning of trainer.resume=auto
    follows with 'skips it'."""
    return read(path, "checkpoint", RESUME_FIX, verdict="cannot be read")


def is_state_dict(obj: Any) -> bool:
    """A bare state_dict: tensors under string keys, what fastreg.export writes and torchvision loads."""
    return (
        isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def check_entries(state: Any, path: Path, entries: tuple[str, ...], fix: str) -> dict:
    """`state`, the contents of `path`, when it is a trainer checkpoint with every one of `entries`; else a
    ValueError that says what the file is, and `fix`: a file of another kind (an exported student, a list) or
    one without an entry would otherwise fail later with a KeyError, or load in part."""
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a trainer checkpoint: {fix}")
    if is_state_dict(state):
        raise ValueError(
            f"{path} is an exported student backbone (a bare state_dict, what fastreg.export writes), not a trainer "
            f"checkpoint: it holds the student's weights alone. {fix}"
        )
    missing = [k for k in entries if k not in state]
    if missing:
        raise ValueError(
            f"{path} has no {listing(repr(k) for k in missing)} entr{'y' if len(missing) == 1 else 'ies'}, which "
            f"every trainer checkpoint has (this file holds {listing(map(str, state), first=12)}): it was written by "
            f"something else, or changed. {fix}"
        )
    return state


def check_crcs(path: Path) -> None:
    """torch.save writes a zip archive whose members carry CRC-32s, and torch.load checks none of them: a
    flipped byte would load as a wrong weight. Reading every member once checks them all. A file that is no
    zip (a truncated one has lost its central directory, a legacy torch.save is a bare pickle) is left to
    torch.load, which fails on the first and has no checksum to check in the second."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"{bad} fails its CRC-32 check")


def load_resume(resume: str, out_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint trainer.resume names, and its contents: None for 'none'; for 'auto' the newest
    readable checkpoint in out_dir (None when out_dir has none), an unreadable one skipped with a warning;
    otherwise the path given, which must be readable (no fallback: the user chose that file)."""
    if resume == "none":
        return None
    if resume != "auto":
        return Path(resume), load(Path(resume))
    found = list_checkpoints(out_dir)
    for path in reversed(found):
        try:
            return path, load(path)
        # a copy gone wrong, or a file system without atomic rename; gone since it was listed: rank 0 moved it aside
        # (fastreg.run_folder), being newer than the one this run resumes from
        except (UnreadableCheckpoint, FileNotFoundError) as e:
            log.warning("%s. trainer.resume=auto skips it and tries the checkpoint before it", e)
    if found:
        raise UnreadableCheckpoint(
            f"none of the {len(found)} checkpoints in {out_dir} can be read (see the warnings "
            "above); move them away, or start over with trainer.resume=none (which moves them into "
            f"{out_dir}/previous/)"
        )
    return None


def remove_partial_saves(out_dir: Path) -> None:
    """Delete the temporary files of saves that were killed (atomic_save's `.<name>.tmp<pid>`): never
    complete, never resumed from, and as large as a checkpoint. Only one run may write to out_dir."""
    for tmp in sorted(out_dir.glob(".ckpt_epoch*.pt.tmp*")):
        log.warning("removing %s, left by a checkpoint save that did not complete", tmp)
        tmp.unlink()


# Settings that cannot change what a run computes, only where it writes, what it shows, how often it logs,
# saves or evaluates, how many threads decode, and when it stops (on too many bad images, NaN steps, or a stop
# signal): a resumed run may change them. Every other setting changes the weights the run ends with: the
# models, the data and its order, the schedule (its cosine spans trainer.epochs, so another length changes
# every learning rate after the resume), the numerics (precision, device, compile, deterministic,
# cpu_threads). Those need trainer.resume_force=true.
FREE_KEYS = (
    "name",
    "trainer.out_dir",
    "trainer.resume",
    "trainer.resume_force",
    "trainer.progress",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.keep_checkpoints",
    "trainer.checkpoint_every",
    "trainer.monitor",
    "trainer.max_bad_steps",
    "trainer.stop_check_every",
    "data.workers",
    "data.val_root",
    "data.knn_train_root",
    "data.max_bad_fraction",
    "eval",
    "optim.recipe_batch",
)
ABSENT = "(absent)"  # a key only one config has: a checkpoint of an older version, or another number of teachers
# Keys added after checkpoints were written, with the value that reproduces how those checkpoints were trained
# (fnmatch patterns: teachers.* is each of several teachers).
LATER_KEYS = {
    "optim.schedule": "iteration",
    "optim.recipe_batch": None,
    "teacher.inference": "eager",
    "teachers.*.inference": "eager",
    "teacher.compile": False,
    "teachers.*.compile": False,
    "trainer.compile_mode": "default",
    "trainer.cuda_graph": False,
    "teacher.cache": None,
    "teachers.*.cache": None,
    "data.teacher_view": "same",
    "data.teacher_crop": "shared",
    "data.small_patches": 0,
    "data.small_patch_size": 96,
    "data.small_patch_scale": [0.05, 0.14],
    # auto runs every teacher of those days as they ran (under autocast): only 1B+ transformers change
    **{f"{t}.{k}": v for t in ("teacher", "teachers.*") for k, v in (("feature", "cls"), ("input_size", None))},
    **{f"{t}.dtype": "auto" for t in ("teacher", "teachers.*")},
}


def compare_configs(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume when a setting that changes the result differs from the checkpoint's, unless the
    current config has trainer.resume_force=true; log every difference either way, with both values."""
    new = flatten(current)
    later = {k: v for k in new for pattern, v in LATER_KEYS.items() if fnmatch.fnmatchcase(k, pattern)}
    old = {**later, **flatten(saved)}
    changed = [k for k in sorted(old.keys() | new.keys()) if k not in old or k not in new or old[k] != new[k]]
    free = [k for k in changed if any(k == f or k.startswith(f + ".") for f in FREE_KEYS)]
    binding = [k for k in changed if k not in free]
    if free:
        log.info(
            "resuming from %s with other settings that do not change the result: %s", path, differences(free, old, new)
        )
    if not binding:
        return
    if not new.get("trainer.resume_force"):
        out_dir = new.get("trainer.out_dir")
        raise ValueError(
            f"checkpoint {path} was written with other settings, which change the result (checkpoint -> this "
            f"run): {differences(binding, old, new)}. A run folder holds one run: resume with the checkpoint's "
            "settings, or run these in another folder with name=<another> (runs/<another>) or "
            f"trainer.out_dir=<folder>, or start afresh here with trainer.resume=none (the files already in "
            f"{out_dir} move into {out_dir}/previous/), or continue the checkpoint's weights under the new settings "
            "with trainer.resume_force=true"
        )
    log.warning(
        "trainer.resume_force=true: resuming from %s with other settings (checkpoint -> this run): %s",
        path,
        differences(binding, old, new),
    )


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"trainer.epochs": 130, "teachers.0.arch": ..., ...}: the dotted keys of a nested config; lists of
    settings (teachers) are numbered, lists of values (data.scale) stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(keys: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    """'key old -> new; ...', values as Python literals ('none' the string, None the null)."""

    def value(config: dict[str, Any], key: str) -> str:
        return repr(config[key]) if key in config else ABSENT

    return "; ".join(f"{k} {value(old, k)} -> {value(new, k)}" for k in keys)


def load_state(module: torch.nn.Module, state: dict, name: str, path: Path) -> None:
    """module.load_state_dict(state), or an error that names every tensor of the checkpoint's `name` that
    does not fit this run's module."""
    own = module.state_dict()
    misfits = (
        [f"{k} missing" for k in own if k not in state]
        + [f"{k} unexpected" for k in state if k not in own]
        + [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
    )
    if misfits:
        # A head's last Linear and the loss's buffers are as wide as their teacher's feature: a teacher file
        # replaced by one of another width fits the config, yet not these tensors.
        raise ValueError(
            f"checkpoint {path} does not fit this run's {name} (checkpoint vs this run): {listing(misfits)}. The "
            "heads and the loss are as wide as their teacher's feature: was the teacher checkpoint file replaced by "
            "one of another width, or a setting changed with trainer.resume_force=true? Resume with the teacher "
            "weights and settings the checkpoint was trained with, or start afresh with trainer.resume=none or "
            "another trainer.out_dir"
        )
    module.load_state_dict(state)


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
