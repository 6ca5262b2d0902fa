"""Stop signals: SIGTERM or SIGUSR1 (Slurm's notice before a preemption or the time limit) end every run with
EXIT_PREEMPTED and one line that says what was saved and what the same command does next.

    from fastreg.train's first line    AtOnce        the handler ends the process where it is (stop_now): start-up
                                                     (index, teacher, checkpoint) saves nothing, so it stops at once
    inside Trainer.fit's loop          StopSignals   the signal is recorded; every rank stops at the same step
                                                     boundary, saves, and fit raises Preempted
    the final evaluation               StopSignals.at_once   stop_now too: training is saved already

Stopping at once unwinds nothing, so the files a process leaves only when it fails (a temporary file, OUT.partial,
a lock) are written inside `cleaned_up`, whose cleanup stop_now runs.

No torch at import: fastreg.train imports this module, and installs AtOnce, before its heavy imports.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

# sysexits.h's EX_TEMPFAIL, "try again later": fastreg.train exits with it after a stop signal and its
# checkpoint, and a Slurm script requeues the job on it (README, "Preemption on Slurm").
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
log = logging.getLogger(__name__)
_cleanups: list[Callable[[], None]] = []  # cleaned_up's, innermost last
_forked = False  # True in a child forked from the process that installed the handlers (a DataLoader worker)


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) inherits the handlers and the cleanups, but owns none of the parent's
    files and speaks for none of its run: a stop at once in it was removing the parent's partial file or lock,
    and printing the parent's line once per worker."""
    global _forked
    _forked = True
    _cleanups.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class Preempted(Exception):
    """Trainer.fit stopped on a stop signal after writing its checkpoint; fastreg.train exits with EXIT_PREEMPTED."""


def stop_now(
    signum: int, during: str, outcome: Callable[[], str], program: str, log: logging.Logger | None
) -> NoReturn:
    """End the process here, with EXIT_PREEMPTED and one line on stderr: the cleanups of the blocks inside
    `cleaned_up` run (temporary files, OUT.partial, a lock), then outcome() says what was saved and what the same
    command does next. Nothing unwinds: an exception raised by a signal handler lands in whatever code runs, and
    third-party code took it for its own (an import cut short that then failed with a RecursionError, OmegaConf's
    `except` turning it into an AttributeError, exit 1); and no atexit hook prints after the line.

    In a forked child the exit is quiet and leaves every file as it is: the parent, which the same signal reaches
    (Slurm and a terminal signal the whole group), says what its run saved."""
    if _forked:
        os._exit(EXIT_PREEMPTED)
    for clean in reversed(_cleanups):
        clean()
    line = f"{signal.Signals(signum).name} received {during}: stopped at once; {outcome()}; {program} exits with code "
    line += f"{EXIT_PREEMPTED} (EX_TEMPFAIL)"
    if log is not None:
        log.warning(line)  # train.log's copy
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed, or interrupted in its own write: the line goes below
            pass
    os.write(2, f"{line}\n".encode())  # not print: the signal may have come inside a write to sys.stderr
    os._exit(EXIT_PREEMPTED)


@contextmanager
def cleaned_up(clean: Callable[[], None]) -> Iterator[None]:
    """clean() when the block ends however it ends: it returns, raises, or a stop signal ends the process inside it
    (stop_now, which unwinds nothing, calls it). For files this process leaves only when it fails: clean() must be
    harmless when there is nothing to remove (after a rename it finds nothing), and may run twice."""
    _cleanups.append(clean)
    try:
        yield
    finally:
        try:
            clean()
        finally:
            _cleanups.remove(clean)


class AtOnce:
    """While entered, the handler of SIGTERM and SIGUSR1 outside the training loop: the first one ends the process
    there (stop_now); later ones change nothing. The previous handlers come back on exit. Trainer.fit's StopSignals
    replace it for the loop, and when they give it back mark it `after training`, with the signal they received if
    any (a stop under way). `during`: what the process does, for the line; `outcome`: what was saved and what the
    same command does, read when the signal comes (when_stopped changes it as the program learns more)."""

    def __init__(self, program: str, outcome: Callable[[], str], during: str = "during start-up"):
        self.received = 0
        self.program, self.outcome, self.during = program, outcome, during
        self.log: logging.Logger | None = None
        self.previous: dict = {}

    def __enter__(self) -> AtOnce:
        self.previous = {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum: int, frame) -> None:
        if not self.received:
            self.received = signum
            stop_now(signum, self.during, self.outcome, self.program, self.log)


def when_stopped(outcome: Callable[[], str], log: logging.Logger | None = None) -> None:
    """From now on a stop at once says outcome(), and logs its line to `log` too (train.log, once open)."""
    for sig in STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if isinstance(handler, AtOnce):
            handler.outcome, handler.log = outcome, log


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 (Slurm's notice before a preemption or the time limit, forwarded by
    torchrun to its workers) only record their number; the training loop reads it at step boundaries. The
    previous handlers come back on exit. A second signal changes nothing: the stop and its save are under way,
    and the save is atomic anyway."""

    def __init__(self):
        self.received = 0  # the first stop signal's number; 0: none
        self.previous: dict = {}
        self.now: tuple[str, str] | None = None  # inside at_once: (what runs, outcome) for stop_now

    def __enter__(self) -> StopSignals:
        self.received = 0
        self.previous = {sig: signal.signal(sig, self.record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
            if isinstance(handler, AtOnce):
                handler.during = "after training"
                handler.received = handler.received or self.received  # a stop under way: later signals change nothing

    def record(self, signum: int, frame) -> None:
        if self.received:
            return
        self.received = signum
        if self.now is not None:
            what, outcome = self.now
            stop_now(signum, f"during {what}", lambda: outcome, "fastreg.train", log)

    @contextmanager
    def at_once(self, what: str, outcome: str) -> Iterator[None]:
        """Inside, a stop signal ends the process there (stop_now, saying `outcome`), and one received before ends it
        on entry. For the final evaluation (`what`): it comes after the last save, no step boundary follows, and a
        k-NN over a large dataset can outlast the grace period."""
        if self.received:
            stop_now(self.received, f"before {what}", lambda: outcome, "fastreg.train", log)
        self.now = what, outcome
        try:
            yield
        finally:
            self.now = None


class StopAgreement:
    """Whether every rank stops, and the signal they agreed on (`signal`, 0: none). With several ranks the check
    is a collective, called by all at the same steps: a rank that stopped alone would leave the others waiting in
    DDP's next all-reduce, and the signal may reach one rank only. It runs at its own steps rather than at the
    logging steps' sync, so that the delay to the stop fits Slurm's grace period whatever log_every is."""

    def __init__(self, world: int, device: torch.device, every: int):
        self.signals, self.world, self.device = StopSignals(), world, device
        self.every = every if world > 1 else 1  # one process asks at every step, at no cost
        self.signal = 0

    def due(self, step: int) -> bool:
        """Whether every rank stops after `step`: asked every trainer.stop_check_every steps."""
        return step % self.every == 0 and self.agreed()

    def agreed(self) -> bool:
        self.signal = self.signals.received
        if self.world > 1:
            import torch  # not at the top: fastreg.train imports this module before torch
            import torch.distributed as dist

            received = torch.tensor(self.signal, device=self.device)
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
            self.signal = int(received.item())  # a host sync, every stop_check_every steps
        return self.signal != 0

    def message(self, step: int, epoch: float, path: Path, out_dir: Path) -> str:
        return (
            f"{signal.Signals(self.signal).name} received: stopped at step {step} (epoch {epoch:.2f}) and saved "
            f"{path}; fastreg.train exits with code {EXIT_PREEMPTED} (EX_TEMPFAIL). To resume, run the same "
            f"command again: trainer.resume=auto continues from the newest checkpoint in {out_dir}"
        )
