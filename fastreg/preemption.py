"""Stop signals: SIGTERM or SIGUSR1 (Slurm's notice before a preemption or the time limit) end every run with
EXIT_PREEMPTED and one line that says what was saved and what the same command does next.

    from fastreg.train's first line    AtOnce        the signal raises Stopped where the process is: start-up
                                                     (index, teacher, checkpoint) saves nothing, so it stops at once
    inside Trainer.fit's loop          StopSignals   the signal is recorded; every rank stops at the same step
                                                     boundary, saves, and fit raises Preempted
    the final evaluation               StopSignals.at_once   raises Stopped: training is saved already

No torch at import: fastreg.train imports this module, and installs AtOnce, before its heavy imports.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# sysexits.h's EX_TEMPFAIL, "try again later": fastreg.train exits with it after a stop signal and its
# checkpoint, and a Slurm script requeues the job on it (README, "Preemption on Slurm").
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Trainer.fit stopped on a stop signal after writing its checkpoint; fastreg.train exits with EXIT_PREEMPTED."""


class Stopped(BaseException):
    """A stop signal where no step boundary comes (start-up, the final evaluation, after training), raised by its
    handler in whatever the process was doing: the work unwinds at once, and atomic writes remove their temporary
    files on the way (fastreg.files.atomic_write). A BaseException, as KeyboardInterrupt is, so that no `except
    Exception` on the way takes it for an error. `outcome`: what was saved and what the same command does next;
    None when the handler cannot know, and fastreg.train reads it from the run folder (fastreg.run_folder)."""

    def __init__(self, signum: int, during: str, outcome: str | None = None):
        super().__init__(signum, during, outcome)
        self.signum, self.during, self.outcome = signum, during, outcome

    def message(self, outcome: str, program: str = "fastreg.train") -> str:
        return (
            f"{signal.Signals(self.signum).name} received {self.during}: stopped at once; {outcome}; {program} "
            f"exits with code {EXIT_PREEMPTED} (EX_TEMPFAIL)"
        )


class AtOnce:
    """While entered, the handler of SIGTERM and SIGUSR1 outside the training loop: the first one raises Stopped;
    later ones change nothing, so that the unwinding's own cleanup is not cut short. The previous handlers come
    back on exit. Trainer.fit's StopSignals replace it for the loop, and when they give it back mark it `after
    training`, with the signal they received if any. `during`: what the process does, for the message."""

    def __init__(self, during: str = "during start-up"):
        self.received = 0
        self.during = during
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
            raise Stopped(signum, self.during)


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 (Slurm's notice before a preemption or the time limit, forwarded by
    torchrun to its workers) only record their number; the training loop reads it at step boundaries. The
    previous handlers come back on exit. A second signal changes nothing: the stop and its save are under way,
    and the save is atomic anyway."""

    def __init__(self):
        self.received = 0  # the first stop signal's number; 0: none
        self.previous: dict = {}
        self.now: tuple[str, str] | None = None  # inside at_once: (what runs, outcome) for Stopped

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
            raise Stopped(signum, f"during {what}", outcome)

    @contextmanager
    def at_once(self, what: str, outcome: str) -> Iterator[None]:
        """Inside, a stop signal raises Stopped(outcome) where the process is, and one received before raises it on
        entry. For the final evaluation (`what`): it comes after the last save, no step boundary follows, and a
        k-NN over a large dataset can outlast the grace period."""
        if self.received:
            raise Stopped(self.received, f"before {what}", outcome)
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
