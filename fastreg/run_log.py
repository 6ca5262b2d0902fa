"""Rank 0's record of a run: train.log, metrics.jsonl, TensorBoard scalars, the progress bar and GPU telemetry."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from logging.handlers import BufferingHandler
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fastreg.checkpoint import atomic_write, remove_partial_saves
from fastreg.checkpointer import Resumed
from fastreg.files import make_writable_dir
from fastreg.messages import listing
from fastreg.monitor import GPUMonitor
from fastreg.run_folder import move_aside

log = logging.getLogger(__name__)


class RunLogger:
    """The run's record, entered around the training loop. Rank 0 writes it all; the other ranks log warnings
    only (set up by the trainer) and write nothing here. The GPU monitor samples rank 0's GPU: it alone writes
    metrics, and DDP's all-reduces keep the ranks in step."""

    def __init__(
        self, out_dir: Path, is_main: bool, start_step: int, device: torch.device, monitor: bool, progress: bool
    ):
        self.is_main, self.device, self.out_dir = is_main, device, out_dir
        self.metrics = MetricsLog(out_dir, is_main, start_step)
        self.monitor = GPUMonitor(device) if monitor and is_main else None
        self.progress = make_progress(is_main and progress)
        self.stack = ExitStack()

    def __enter__(self) -> RunLogger:
        if self.monitor:
            self.stack.enter_context(self.monitor)
        self.stack.enter_context(self.progress)
        self.log_monitor_start()
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()  # stops the monitor's sampler, also when training raised
        if self.monitor and self.monitor.summary()["available"]:
            log.info("GPU telemetry over the run: %s", json.dumps(self.monitor.summary()))
        self.close()

    def close(self) -> None:
        """metrics.jsonl and TensorBoard closed; for a trainer stepped without fit (benchmarks)."""
        self.metrics.close()

    def startup(self, config: dict, commit: str, lines: list[str]) -> None:
        """The commit, the resolved config and `lines` (what runs: device, loader, optimizer...) in train.log; the
        console gets `lines` and where the config is, not its ~100 lines of YAML."""
        if not self.is_main:
            return
        path = self.out_dir / "train.log"
        yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        log_to_file_only(path, f"fastreg commit {commit}, resolved config:\n{yaml}")
        log.info("fastreg commit %s; the resolved config is in %s", commit[:12], path)
        for line in lines:
            log.info(line)

    def log_monitor_start(self) -> None:
        if not self.monitor:
            return
        status = self.monitor.summary()
        if status["available"]:
            log.info("GPU telemetry of %s every %g s: gpu/* in the metrics", self.device, self.monitor.interval_s)
        else:
            log.info("GPU telemetry unavailable (%s): no gpu/* metrics", status["reason"])

    def epoch_task(self, epoch: int, epochs: int, batches: int, done: int):
        """The progress bar's task for 0-based `epoch`, `done` of its `batches` already trained (a resume)."""
        return self.progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=batches, completed=done, loss="-", lr="-", ips="-"
        )

    def advance(self, task) -> None:
        """One more batch of the epoch's task on the progress bar."""
        self.progress.advance(task)

    def window(self) -> dict[str, float]:
        """gpu/* mean and peak since the last call; {} without a monitor or telemetry."""
        return self.monitor.window() if self.monitor else {}

    def step(self, step: int, values: dict[str, float], task) -> None:
        """A logging step's metrics (loss, lr and img_per_s among them), with the GPU window since the last one."""
        self.metrics.write(step, {**values, **self.window()})
        self.progress.update(
            task, loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}", ips=f"{values['img_per_s']:,.0f}"
        )

    def evaluation(self, step: int, epoch: int, results: dict[str, float]) -> None:
        log.info("epoch %d k-NN: %s", epoch, json.dumps(results))
        self.metrics.write(step, {f"eval/{k}": v for k, v in results.items()})


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
    log.warning(
        "%s: dropping %d line(s) past step %d, where this run starts: an earlier run in this folder logged them "
        "after the checkpoint this run resumes from",
        path,
        len(lines) - len(kept),
        step,
    )
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def logged_step(line: str) -> float:
    """A metrics line's step; inf for a line a kill cut short (no newline, or not JSON), which goes too."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except json.JSONDecodeError:
        return math.inf


def logged_evaluation(path: Path, step: int) -> dict[str, float]:
    """The k-NN results the metrics file `path` holds at `step`, without their eval/ prefix; {} when none."""
    results: dict[str, float] = {}
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    for line in lines:
        if logged_step(line) == step:
            results.update({k.removeprefix("eval/"): v for k, v in json.loads(line).items() if k.startswith("eval/")})
    return results


def make_progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def attach_log_file(path: Path) -> logging.Handler:
    """The root logger's handler that writes `path`, added unless it is there already."""
    root = logging.getLogger()
    target = str(path.resolve())
    for h in root.handlers:
        if getattr(h, "baseFilename", None) == target:
            return h  # a second Trainer in this process (tests, notebooks): don't write every line twice
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root.addHandler(handler)
    return handler


def log_to_file_only(path: Path, message: str) -> None:
    """`message` as an INFO line of the log file `path` (its handler, attach_log_file's) and not on the console."""
    log_file = attach_log_file(path)
    log_file.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))


def open_run_dir(out_dir: Path, is_main: bool, find: Callable[[], Resumed | None]) -> Resumed | None:
    """The checkpoint `find` picks to resume from (fastreg.checkpointer.find), with the run folder set up around
    it. Rank 0: trainer.out_dir created and writable before anything is read; `find` and its checks, so that a
    refused resume leaves the folder as it was; then the files of earlier runs that this one does not continue
    moved into previous/ (fastreg.run_folder), train.log attached, with what `find` logged, and the files of saves
    that were killed removed. Other ranks log warnings only and write nothing in the folder; of its files they read
    the checkpoint resumed from only, which stays where it is."""
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
        return find()
    make_out_dir(out_dir)
    held = BufferingHandler(capacity=math.inf)  # find's lines, for train.log (they reach the console as usual)
    logging.getLogger().addHandler(held)
    try:
        resumed = find()
    finally:
        logging.getLogger().removeHandler(held)
    moved = move_aside(out_dir, resumed.path if resumed else None)
    log_file = attach_log_file(out_dir / "train.log")
    for record in held.buffer:
        log_file.handle(record)
    if moved:
        aside, names = moved
        log.info("moved the files of an earlier run that this one does not continue into %s: %s", aside, listing(names))
    remove_partial_saves(out_dir)
    return resumed


def make_out_dir(path: Path) -> None:
    """Create trainer.out_dir and check that a file can be written there, before any work is done."""
    try:
        make_writable_dir(path)
    except OSError as e:
        raise OSError(
            e.errno,
            f"trainer.out_dir={path} is not a writable directory ({e.strerror}); checkpoints, "
            "train.log and the metrics go there. Pass trainer.out_dir=<a directory you can "
            "write to>, or fix its permissions",
        ) from e
