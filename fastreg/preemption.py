"""Stop signals: SIGTERM or SIGUSR1 (Slurm's notice before a preemption or the time limit) stop training at a
step boundary, after a checkpoint; fastreg.train then exits with EXIT_PREEMPTED."""

from __future__ import annotations

import signal

# sysexits.h's EX_TEMPFAIL, "try again later": fastreg.train exits with it after a stop signal and its
# checkpoint, and a Slurm script requeues the job on it (README, "Preemption on Slurm").
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Trainer.fit stopped on a stop signal after writing its checkpoint; fastreg.train exits with EXIT_PREEMPTED."""


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 (Slurm's notice before a preemption or the time limit, forwarded by
    torchrun to its workers) only record their number; the training loop reads it at step boundaries. The
    previous handlers come back on exit. A second signal changes nothing: the stop and its save are under way,
    and the save is atomic anyway."""

    def __init__(self):
        self.received = 0  # the first stop signal's number; 0: none
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        self.received = 0
        self.previous = {sig: signal.signal(sig, self.record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def record(self, signum: int, frame) -> None:
        self.received = self.received or signum
