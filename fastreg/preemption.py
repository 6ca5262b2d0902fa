"""Stop signals: SIGTERM or SIGUSR1 (Slurm's notice before a preemption or the time limit) stop training at a
step boundary, after a checkpoint; fastreg.train then exits with EXIT_PREEMPTED."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

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
