"""Rank 0's record of a run: train.log, metrics.jsonl, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from fastreg.checkpoint import atomic_write

log = logging.getLogger(__name__)


class MetricsLog:
    """JSONL lines and TensorBoard scalars, written by rank 0 only. A run starting at step S (its checkpoint's,
    or 0) first drops what was logged after S: a killed run logs past its last checkpoint, and the resumed
    run logs those steps again. metrics.jsonl then holds every step once."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            drop_lines_after(out_dir / "metrics.jsonl", start_step)
            self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
            # TensorBoard hides the older event files' points at steps >= purge_step
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def drop_lines_after(path: Path, step: int) -> None:
    """Rewrite the metrics file `path` without its lines past `step`, atomically (a kill keeps the old file)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) == len(lines):
        return
    log.warning("%s: dropping %d line(s) past step %d, where this run starts (logged by a run that stopped after "
                "its last checkpoint)", path, len(lines) - len(kept), step)
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def logged_step(line: str) -> float:
    """A metrics line's step; inf for a line a kill cut short (no newline, or not JSON), which goes too."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except json.JSONDecodeError:
        return math.inf


def make_progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
        TimeRemainingColumn(), disable=not enabled,
    )


def attach_log_file(path: Path) -> None:
    root = logging.getLogger()
    target = str(path.resolve())
    if any(getattr(h, "baseFilename", None) == target for h in root.handlers):
        return  # a second Trainer in this process (tests, notebooks): don't write every line twice
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root.addHandler(handler)
