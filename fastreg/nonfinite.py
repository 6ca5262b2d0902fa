"""Steps whose loss is NaN or inf on any rank are skipped on the device, with no host sync, and counted; a long
run of them stops training (trainer.max_bad_steps). build_guard picks one of two guards by the optimizer, and
train.log names it:

StepSkip, torch's fused SGD/Adam/AdamW (optim=sgd on CUDA): no copy of the weights
    backup <- model buffers          before the forward (BatchNorm's running statistics move in it)
    forward; backward
    found_inf <- not ok              ok = the loss was finite on every rank; fp16: max with GradScaler's
    optimizer step                   the fused kernel writes neither params nor state where found_inf = 1
    buffers <- where(ok, buffers, backup)
StepUndo, any other optimizer (timm Lars/Lamb, apex): a copy of everything the step changes
    backup <- x                     for x in trainable params, model buffers, optimizer state; before the forward
    forward; backward; optimizer step                                                  as always
    x <- where(ok, x, backup)       after the step
    x <- where(ok, x, 0)            state the step created (a first step): zeros are its fresh value

Zeroing the gradients would not skip the step (weight decay and momentum still move the weights), and
masking by multiplication fails because NaN * 0 = NaN. The counters live on the device too; the trainer
reads them where it syncs anyway (logging steps and saves).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def build_guard(
    buffers: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> StepSkip | StepUndo:
    """StepSkip where every param group runs torch's fused kernel, which takes found_inf; StepUndo otherwise.
    `buffers`: the trained model's, by name (BatchNorm's running statistics move in the forward)."""
    fused = isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)) and all(
        group.get("fused") for group in optimizer.param_groups
    )
    return StepSkip(buffers, optimizer, scaler) if fused else StepUndo(buffers, optimizer)


class StepSkip:
    """A bad step skipped inside torch's fused optimizer kernels through found_inf, the flag GradScaler hands
    them: parameters and optimizer state (momentum, Adam's moments and step count) are left unwritten, bitwise,
    so none of them is copied. Where no GradScaler runs, optimizer.found_inf is this guard's flag for good; with
    fp16's, which sets found_inf from the gradients before each step and removes it after, a pre-step hook adds
    the loss check (the scaler's scale update still sees only the gradients). The model's buffers, which the
    optimizer does not own, are put back from a copy (BufferUndo). A skipped first step leaves zeros in the
    state it created, as StepUndo does: fused SGD allocates its momentum uninitialized and would leave it so.
    Not covered, as with StepUndo: the loss modules' buffers.
    Cost per step: a few small kernels, whatever the size of the model."""

    name = "skipped inside the fused optimizer kernel (found_inf); model buffers restored from a copy"

    def __init__(
        self, buffers: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ):
        self.optimizer, self.buffers = optimizer, BufferUndo(buffers)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.bad = torch.zeros((), device=self.params[0].device)  # float32 1.0 = skip: what the kernels read
        self.skipped, self.fresh = self.bad, []  # the flag the kernel got; params without state before the step
        if scaler.is_enabled():
            optimizer.register_step_pre_hook(self.add_loss_check)
        else:
            optimizer.found_inf = self.bad

    def add_loss_check(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Runs inside scaler.step, after GradScaler has set found_inf; max, not sum: the kernels test == 1."""
        self.skipped = optimizer.found_inf = torch.maximum(optimizer.found_inf, self.bad)

    def save(self) -> None:
        self.buffers.save()

    def skip_unless(self, ok: torch.Tensor) -> None:
        """ok: 0-dim bool on the device; before the optimizer step."""
        torch.logical_not(ok, out=self.bad)
        state = self.optimizer.state
        self.fresh = [p for p in self.params if p not in state] if len(state) < len(self.params) else []

    @torch.no_grad()
    def undo_unless(self, ok: torch.Tensor) -> None:
        """After the optimizer step; ok as given to skip_unless."""
        created = [t for p in self.fresh for t in self.optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
        if created:
            skipped = self.skipped.bool()
            for t in created:
                torch.where(skipped, t.new_zeros(()), t, out=t)
        self.buffers.undo_unless(ok)


class BufferUndo:
    """The model's buffers, put back on the device where the step was bad, bitwise. One flat copy per dtype
    (float running statistics, int64 batch counts): a step costs a few kernels, not one per buffer."""

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.groups: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for b in buffers.values():
            self.groups[b.dtype].append(b)
        self.backup: dict[torch.dtype, torch.Tensor] = {}

    @torch.no_grad()
    def save(self) -> None:
        self.backup = {dtype: flat(buffers) for dtype, buffers in self.groups.items()}

    @torch.no_grad()
    def undo_unless(self, ok: torch.Tensor) -> None:
        for dtype, buffers in self.groups.items():
            kept = torch.where(ok, flat(buffers), self.backup[dtype])
            parts = kept.split([b.numel() for b in buffers])
            torch._foreach_copy_(buffers, [part.view_as(b) for part, b in zip(parts, buffers)])


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class StepUndo:
    """A copy of what a training step changes, put back on the device where the step was bad: the guard for
    optimizers whose step takes no found_inf (timm Lars/Lamb, apex, torch's unfused ones, so SGD on CPU).

    Covered: the optimizer's parameters, the model's buffers (BatchNorm's running statistics: a NaN forward
    poisons them) and the optimizer's per-parameter tensor state (momentum buffers, Lamb's moments). Bitwise:
    after a bad step they equal what they were before it. A bad first step leaves zeros in the state it
    created, which is what SGD's and Lars' momentum (buf = 0.9 * 0 + grad) and Lamb's moments start from.
    Not covered: state kept in the param groups (timm Lamb's step count, a CPU tensor, advances, so its bias
    correction runs one step ahead) and the loss modules' buffers (the teacher center, SEED's queue), which
    only the frozen teachers feed.
    Cost: a second copy of all of it in memory; per step one copy and one torch.where per tensor.
    """

    name = "undone from a copy of the weights, buffers and optimizer state (the optimizer takes no found_inf)"

    def __init__(self, buffers: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer):
        self.buffers, self.optimizer = buffers, optimizer
        self.backup: dict[tuple, torch.Tensor] = {}

    def tensors(self) -> dict[tuple, torch.Tensor]:
        """The live tensors, keyed so that a state tensor the optimizer replaces still finds its backup."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        named = {("param", i): p for i, p in enumerate(params)}
        named.update({("buffer", name): b for name, b in self.buffers.items()})
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    named[("state", i, key)] = value
        return named

    @torch.no_grad()
    def save(self) -> None:
        live = self.tensors()
        if live.keys() != self.backup.keys():  # the first step created the optimizer state, or a resume replaced it
            self.backup = {key: torch.empty_like(t) for key, t in live.items()}
        torch._foreach_copy_(list(self.backup.values()), [live[key] for key in self.backup])

    def skip_unless(self, ok: torch.Tensor) -> None:
        """Nothing before the step: it runs, and undo_unless puts back what it changed."""

    @torch.no_grad()
    def undo_unless(self, ok: torch.Tensor) -> None:
        """ok: 0-dim bool on the device. Where it is True every tensor keeps its value, bitwise."""
        for key, t in self.tensors().items():
            old = self.backup.get(key)
            torch.where(ok, t, t.new_zeros(()) if old is None else old, out=t)


@dataclass
class BadStepsSeen:
    """The device counters on the host; losses are the mean over the ranks."""

    tripped: bool  # some run of consecutive bad steps reached the limit
    run: int  # consecutive bad steps up to now
    first: int  # the first step of that run (numbered as in metrics.jsonl)
    total: int  # bad steps in this process's run
    losses: dict[str, float]  # at step `first`


class BadSteps:
    """Counts bad steps on the device. The run that reaches the limit keeps its first step and losses
    even if good steps follow before the next check: a long divergence is never forgotten."""

    def __init__(self, loss_names: list[str], limit: int, device: torch.device):
        self.names, self.limit = loss_names, limit
        self.run, self.first, self.total = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)
        self.losses = torch.zeros(len(loss_names), device=device)

    @torch.no_grad()
    def record(self, ok: torch.Tensor, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """ok: this step's 0-dim bool; metrics: 0-dim tensors, among them `names`. A few tiny kernels, no sync."""
        bad = ~ok
        starts = bad & (self.run == 0) & ~self.tripped
        losses = torch.stack([metrics[name].detach().float() for name in self.names])
        self.first = torch.where(starts, step, self.first)
        self.losses = torch.where(starts, losses, self.losses)
        self.run = torch.where(bad, self.run + 1, 0)
        self.tripped |= self.run >= self.limit
        self.total += bad

    def read(self, world: int) -> BadStepsSeen:
        """A host sync, and a collective when world > 1: every rank must call it at the same step."""
        counters = torch.stack([self.tripped.double(), self.run.double(), self.first.double(), self.total.double()])
        packed = torch.cat([counters, self.losses.double()])
        if world > 1:
            # SUM / world: the counters are equal on every rank (the skip decision is agreed), so this is
            # exact for them; the losses become their mean over the ranks, NaN if any rank's is
            dist.all_reduce(packed)
            packed /= world
        tripped, run, first, total, *losses = packed.tolist()
        return BadStepsSeen(bool(tripped), int(run), int(first), int(total), dict(zip(self.names, losses)))


class Divergence:
    """The trainer's view of bad steps: the agreed loss check, the device counters, and at logging steps and saves
    the warning about skipped steps or the error that stops a diverged run.

    world: processes; batches: per epoch (to name the epoch); out_dir: where the intact checkpoints are."""

    def __init__(
        self, loss_names: list[str], limit: int, world: int, device: torch.device, batches: int, out_dir: Path
    ):
        self.counts = BadSteps(["loss", *loss_names], limit, device)
        self.limit, self.world, self.batches, self.out_dir = limit, world, batches, out_dir
        self.logged = 0  # bad steps up to the last logging step

    def loss_is_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device, the same on every rank: DDP averages the gradients, so one rank's NaN
        reaches every rank's weights. NCCL queues the all-reduce on the stream: no host sync."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)  # int: gloo and NCCL both reduce it
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.bool()

    def record(self, ok: torch.Tensor, step: int, metrics: dict[str, torch.Tensor]) -> None:
        self.counts.record(ok, step, metrics)

    def check(self) -> int:
        """Raise once trainer.max_bad_steps consecutive steps had a NaN or inf loss; else the number of steps
        skipped so far. Every rank calls it at the same steps (logging steps, saves): the counters are reduced
        over the ranks, so all of them stop together rather than some waiting in the next collective."""
        seen = self.counts.read(self.world)  # a host sync: only at logging steps and saves
        if seen.tripped:
            raise FloatingPointError(self.message(seen))
        return seen.total

    def skipped_since_log(self, step: int, warn: bool) -> int:
        """Steps skipped since the previous logging step, with a warning (where `warn`) if there are any."""
        total = self.check()
        skipped, self.logged = total - self.logged, total
        if skipped and warn:
            log.warning(
                "%d step(s) up to step %d had a NaN or inf loss and were skipped (weights and optimizer "
                "state left as before them); trainer.max_bad_steps=%d consecutive ones stop training",
                skipped,
                step,
                self.limit,
            )
        return skipped

    def message(self, seen: BadStepsSeen) -> str:
        losses = ", ".join(f"{name} {value:.4g}" for name, value in seen.losses.items())
        over = f" (mean over the {self.world} ranks)" if self.world > 1 else ""
        return (
            f"the loss was NaN or inf in trainer.max_bad_steps={self.limit} consecutive steps from step {seen.first} "
            f"(epoch {(seen.first - 1) // self.batches + 1}); at step {seen.first}: {losses}{over}. Those steps "
            f"were skipped: the weights, and any checkpoint written since, are those from before step {seen.first}, "
            f"and the last checkpoint in {self.out_dir} is intact. Lower optim.base_lr, add warmup "
            "(optim.warmup_epochs) or use trainer.precision=bf16/fp32, and check the teacher whose loss is not "
            "finite; then resume from that checkpoint"
        )
