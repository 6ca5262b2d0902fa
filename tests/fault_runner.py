"""Run `python -m fastreg.train` with a fault injected: a signal at a chosen step, or SIGKILL inside a save.

    python tests/fault_runner.py [--at-step N [--signal KILL|TERM|INT|USR1] [--rank R]]
                                 [--in-save NAME:half|before_rename] [--random-ops] -- <hydra overrides>

--at-step N       the signal reaches the process when step N + 1 is about to start: steps 1..N are done,
                  logged, and their saves (inside the epoch or at its end) written.
--signal          which signal (default KILL: the process dies at once, nothing is cleaned up).
--rank R          under torchrun, only rank R gets it (default: every rank).
--in-save NAME:P  SIGKILL while the checkpoint NAME (e.g. ckpt_epoch0002.pt) is written: `half` after half
                  of its temporary file is on disk, `before_rename` once the temporary file is complete and
                  fsynced but not yet renamed to NAME.
--random-ops      every step's images get noise from torch's, numpy's and python's global generators, as
                  dropout or host-side augmentation would draw (not a fault): a resume that does not restore
                  all three generators diverges.

The faults are monkeypatches of this process alone; fastreg's code runs unchanged. A run killed by a
signal exits with -signal (subprocess's returncode).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import random
import signal
import sys

import numpy as np
import torch

from fastreg import checkpoint as ckpt
from fastreg.train import main
from fastreg.trainer import Trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def signal_at_step(step: int, sig: signal.Signals, rank: int | None) -> None:
    train_step = Trainer.train_step

    def faulty(self, *args, **kwargs):
        if self.step == step and rank in (None, self.rank):
            os.kill(os.getpid(), sig)
        return train_step(self, *args, **kwargs)

    Trainer.train_step = faulty


def add_random_ops() -> None:
    train_step = Trainer.train_step

    def noisy(self, batch, *args, **kwargs):
        noise = torch.randn_like(batch.images) + float(np.random.rand()) + random.random()
        return train_step(self, dataclasses.replace(batch, images=batch.images + 0.01 * noise), *args, **kwargs)

    Trainer.train_step = noisy


def kill_in_save(name: str, point: str) -> None:
    """Wraps torch.save and os.replace as fastreg.checkpoint calls them: the temporary file is the one
    atomic_write opens for `name` (`.<name>.tmp<pid>`)."""
    if point == "half":
        save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if f"{name}.tmp" not in str(getattr(f, "name", f)):
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getbuffer()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        ckpt.torch.save = half_save
    else:
        replace = os.replace

        def replace_never(src, dst, *args, **kwargs):
            if str(dst).endswith(name):
                die()
            return replace(src, dst, *args, **kwargs)

        ckpt.os.replace = replace_never


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at-step", type=int)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT", "USR1"])
    parser.add_argument("--rank", type=int)
    parser.add_argument("--in-save", metavar="NAME:POINT")
    parser.add_argument("--random-ops", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.in_save and args.in_save.rpartition(":")[2] not in ("half", "before_rename"):
        parser.error(f"--in-save {args.in_save}: the point after ':' must be half or before_rename")
    return args, args.overrides


if __name__ == "__main__":
    args, overrides = parse(sys.argv[1:])
    if args.random_ops:
        add_random_ops()
    if args.at_step is not None:
        signal_at_step(args.at_step, signal.Signals[f"SIG{args.signal}"], args.rank)
    if args.in_save:
        kill_in_save(*args.in_save.rpartition(":")[::2])
    sys.argv = [sys.argv[0], *overrides]  # hydra reads the overrides from sys.argv
    main()
