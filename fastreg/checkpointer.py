"""A run's state in one file per save, written atomically by rank 0 (fastreg.checkpoint) and read back by every
rank. Each part saves its own entries and reads them back:

    Distiller   student, heads, loss          the trained part (fastreg.distiller)
    Entry       optimizer, scaler             one state_dict under one key
    Progress    epoch, step, batch_in_epoch   where the run stands
    per rank    data, rng                     each rank's loader position and generators, a list in rank order
    meta        config, commit                what wrote it

The keys are those of every checkpoint fastreg has written: old files resume, and fastreg.export and fastreg.eval
read the student from them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from fastreg import checkpoint as ckpt
from fastreg.distributed import gather

log = logging.getLogger(__name__)


class Part(Protocol):
    def save_state(self) -> dict[str, Any]:
        """The part's entries of the checkpoint file."""

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        """Take the part's entries from the file's `state`; `source` names the file in errors."""


class Entry:
    """One state_dict under one key (the optimizer's, the GradScaler's)."""

    def __init__(self, key: str, save: Callable[[], dict], load: Callable[[dict], None]):
        self.key, self.save, self.load = key, save, load

    def save_state(self) -> dict[str, Any]:
        return {self.key: self.save()}

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        self.load(state[self.key])


@dataclass
class Progress:
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done, bad ones included
    batch_in_epoch: int = 0  # batches done of epoch `epoch` + 1; > 0 in a save inside an epoch

    def save_state(self) -> dict[str, Any]:
        return asdict(self)

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)  # older checkpoints: epoch ends only


@dataclass
class Resumed:
    path: Path
    state: dict[str, Any]


# What every trainer checkpoint has held since the first, and a resume reads: a file without one of them is refused
# before any part loads. Entries added later are read where present (batch_in_epoch, the per-rank data and rng).
ENTRIES = ("student", "heads", "loss", "optimizer", "scaler", "epoch", "step", "config", "commit")
RESUME_ELSE = (
    "Resume from another checkpoint, trainer.resume=<out_dir>/ckpt_epochNNNN.pt (or auto: the newest readable one "
    "in trainer.out_dir), or start afresh with trainer.resume=none"
)


def find(resume: str, out_dir: Path, config: dict) -> Resumed | None:
    """The checkpoint trainer.resume picks, checked to be a trainer checkpoint with every entry a resume reads and
    against this run's config (fastreg.checkpoint)."""
    found = ckpt.load_resume(resume, out_dir)
    if found is None:
        return None
    path, state = found
    ckpt.check_entries(state, path, ENTRIES, RESUME_ELSE)
    ckpt.compare_configs(state["config"], config, path)
    return Resumed(path, state)


def rank_state(resumed: Resumed | None, key: str, rank: int, world: int) -> dict | None:
    """This rank's entry of a per-rank list; None when the file holds another number of ranks (warned)."""
    saved = (resumed.state.get(key) or []) if resumed else []
    if len(saved) == world:
        return saved[rank]
    if saved:
        log.warning(
            "%s holds the %s of %d process(es), this run has %d: it starts afresh", resumed.path, key, len(saved), world
        )
    return None


class Checkpointer:
    def __init__(
        self,
        out_dir: Path,
        parts: list[Part],
        per_rank: dict[str, Callable[[], dict]],
        meta: dict,
        rank: int,
        world: int,
        keep: int,
    ):
        self.out_dir, self.parts, self.per_rank, self.meta = out_dir, parts, per_rank, meta
        self.rank, self.world, self.keep = rank, world, keep

    def save(self, path: Path) -> Path:
        """Every rank calls it (it gathers the per-rank parts); rank 0 writes `path` and prunes old saves."""
        ranks = {key: gather(state(), self.world) for key, state in self.per_rank.items()}
        if self.rank == 0:
            state = {**ranks, **self.meta}
            for part in self.parts:
                state.update(part.save_state())
            ckpt.atomic_save(state, path)
            ckpt.prune(self.out_dir, self.keep, path)
            log.info("saved %s", path)
        return path

    def restore(self, resumed: Resumed) -> None:
        """The parts and this rank's generators. The loader takes its position when it is built (rank_state)."""
        for part in self.parts:
            part.load_state(resumed.state, resumed.path)
        rng = rank_state(resumed, "rng", self.rank, self.world)
        if rng:  # else the data position fails inside an epoch, and at an epoch's end the next epoch reseeds
            ckpt.set_rng_state(rng)
        log.info(
            "resumed from %s (epoch %d, step %d, written at commit %s)",
            resumed.path,
            resumed.state["epoch"],
            resumed.state["step"],
            resumed.state["commit"],
        )


def check_data_position(resumed: Resumed, progress: Progress, loader) -> None:
    """A run resumed inside an epoch must continue where the saved one stopped, or it would train on some samples
    twice and count its steps wrong."""
    epoch, done = progress.epoch, progress.batch_in_epoch
    if done and loader.position != (epoch, done):
        raise ValueError(
            f"{resumed.path} was saved inside epoch {epoch + 1}, after batch {done}, and this run's {loader.name} "
            "loader cannot continue there (its loader, data, world size or batch size differ; see the warning "
            "above). Resume with the same settings, or from a checkpoint saved at an epoch's end: "
            "trainer.resume=<out_dir>/ckpt_epochNNNN.pt"
        )
