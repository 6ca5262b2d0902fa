"""The work of `python -m fastreg.cache_teacher` (fastreg/cache_teacher.py says what it writes and why): the training
config composed, OUT.lock held, every rank's rows written into OUT.partial, checked, and renamed to OUT."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from fastreg import checkpoint as ckpt
from fastreg import files
from fastreg.cached_teacher import FEATURES, META, TEACHER_KEYS, block_checksums
from fastreg.config import CACHE_REQUIRED, TeacherConfig, TrainConfig, to_config
from fastreg.distributed import agree_on_failure, seed_everything, setup_distributed
from fastreg.index import DatasetIndex
from fastreg.lock import writer_lock
from fastreg.messages import listing
from fastreg.pipelines import dataset_index, eval_batches, samples_digest, shard_range
from fastreg.placement import Placement
from fastreg.preemption import cleaned_up
from fastreg.teachers import build_teacher

log = logging.getLogger(__name__)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The training config of `overrides`, a cached recipe's required teacher.cache (what this command writes)
    unset."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("fastreg.configs", version_base="1.3"):
        raw = compose("config", overrides=overrides, return_hydra_config=True)
    without_hydra_runtime(raw)
    for teacher in [raw.teacher, *raw.teachers]:
        if teacher is not None and teacher.cache == CACHE_REQUIRED:
            teacher.cache = None
    cfg = to_config(raw)
    if cfg.demo or cfg.data.loader == "synthetic":
        raise ValueError("the cache needs a dataset: pass experiment=<name> (or experiment=none) and data.root=...")
    return cfg


def without_hydra_runtime(raw: DictConfig) -> None:
    """Drop compose()'s hydra node, resolving what needs it as `python -m fastreg.train` would. configs/config.yaml
    sets trainer.out_dir: ${hydra:runtime.output_dir}, which only a hydra run can resolve (compose() outside
    @hydra.main has no runtime: "HydraConfig was not set"). That run's folder is hydra.run.dir; this command writes
    nothing there, but the config names it as the training run would."""
    with open_dict(raw):
        out_dir = OmegaConf.to_container(raw.trainer, resolve=False)["out_dir"]
        if isinstance(out_dir, str) and out_dir.startswith("${hydra:"):
            raw.trainer.out_dir = str(Path(raw.hydra.run.dir).resolve())
        del raw["hydra"]


def write_cache(cfg: TrainConfig, out: Path, teacher_index: int, dtype: str, arguments: list[str]) -> Path:
    """Compute and write the cache of cfg.teachers[teacher_index]; every rank returns `out` once it is complete.
    `arguments`: the command line's after OUT, kept in meta.json for the messages about a damaged cache."""
    rank, world, device = setup_distributed(cfg.trainer.device)
    with ExitStack() as held:
        agree(lambda: take_lock(out, held) if rank == 0 else None, world, f"take the lock of {out}")
        write_locked(cfg, out, teacher_index, dtype, arguments, (rank, world), device)
    return out


def take_lock(out: Path, held: ExitStack) -> None:
    """Rank 0: hold OUT.lock until `held` closes, and refuse an OUT that exists (never overwritten)."""
    held.enter_context(writer_lock(out, "python -m fastreg.cache_teacher"))
    if out.exists():
        raise FileExistsError(f"{out} exists: delete it, or pass another folder")


def write_locked(
    cfg: TrainConfig, out: Path, teacher_index: int, dtype: str, arguments: list[str], shard: tuple[int, int], device
) -> None:
    """write_cache's work, while rank 0 holds OUT.lock; a failed write leaves neither OUT nor OUT.partial."""
    rank, world = shard
    place = Placement.of(cfg.trainer.precision, cfg.trainer.channels_last, device)
    index = dataset_index(cfg.data, rank, world)
    t = cfg.teachers[teacher_index]
    seed_everything(cfg.trainer.seed, -1, 0)  # a random teacher (benchmarks) as the trainer would build it
    teacher = build_teacher(t, amp_dtype=place.amp_dtype, device=device)
    partial, shape = out.with_name(out.name + ".partial"), (len(index.samples), teacher.dim)
    # rank 0 removes it on a failure (every rank is past its writes: agree is a collective) or a stop signal
    # (preemption.stop_now); after the rename there is nothing to remove
    with cleaned_up(lambda: shutil.rmtree(partial, ignore_errors=True)) if rank == 0 else nullcontext():
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
            partial.mkdir(parents=True)
            np.lib.format.open_memmap(partial / FEATURES, mode="w+", dtype=dtype, shape=shape).flush()
        barrier(world)
        agree(lambda: write_rows(partial, teacher, cfg, index, shard, place), world, f"write its rows into {partial}")
        meta = describe(cfg, t, index, shape, dtype, arguments)
        agree(lambda: finish(partial, out, meta, world) if rank == 0 else None, world, f"complete {out}")


def agree(work: Callable[[], object], world: int, what: str) -> None:
    """work() on this rank, then every rank raises if any rank's failed (fastreg.distributed.agree_on_failure)."""
    failure = None
    try:
        work()
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait for this one forever
        failure = e
    agree_on_failure(failure, world, what)


def write_rows(partial: Path, teacher: nn.Module, cfg: TrainConfig, index, shard: tuple[int, int], place: Placement):
    """This rank's rows into the shared file, then its mark that they are there."""
    table = np.load(partial / FEATURES, mmap_mode="r+")
    fill(table, teacher, cfg, index, shard, place)
    table.flush()
    del table
    (partial / f"rank{shard[0]}.done").touch()


def finish(partial: Path, out: Path, meta: dict, world: int) -> None:
    """Rank 0: every rank's rows are in the file it sees, so it is whole; meta.json, then the rename to `out`."""
    missing = [r for r in range(world) if not (partial / f"rank{r}.done").exists()]
    if missing:
        raise OSError(
            f"rank(s) {missing} wrote their rows into another {partial}: the cache's folder must be on a file "
            "system every rank shares"
        )
    for r in range(world):
        (partial / f"rank{r}.done").unlink()
    meta = {**meta, "checksums": block_checksums(np.load(partial / FEATURES, mmap_mode="r"))}
    files.atomic_write(partial / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    files.sync(partial / FEATURES)
    partial.rename(out)
    files.sync(out.parent)


def fill(table: np.ndarray, teacher: nn.Module, cfg: TrainConfig, index, shard: tuple[int, int], place: Placement):
    """table[i] = teacher(eval view of image i) for the positions of `shard`."""
    rows = shard_range(len(index.samples), *shard)
    d = cfg.data
    batches = eval_batches(
        d.loader, d.root, d.crop_size, cfg.eval.batch_size, cfg.eval.workers, place.device, shard,
        file_list=d.file_list, max_bad_fraction=d.max_bad_fraction, progress=False,
    )  # fmt: skip
    start, done = time.perf_counter(), rows.start
    for images, _ in batches:
        images = images.to(place.device, non_blocking=True).contiguous(memory_format=place.memory_format)
        features = teacher(images.to(torch.float32) if place.amp_dtype is None else images)  # (B, D) float32
        names = [rel for rel, _ in index.samples[done : done + len(features)]]
        table[done : done + len(features)] = finite_rows(features.cpu().numpy(), table.dtype, names, cfg)
        done += len(features)
    if done != rows.stop:
        raise RuntimeError(f"the evaluation loader gave positions {rows.start}..{done}, expected ..{rows.stop}")
    log.info("rank %d: %d features in %.1f s", shard[0], len(rows), time.perf_counter() - start)


def finite_rows(values: np.ndarray, dtype: np.dtype, names: list[str], cfg: TrainConfig) -> np.ndarray:
    """A batch's features (B, D) float32 as rows of the table's dtype, refused when a value is not finite (in float32,
    or once cast): the trainer would skip every step that looks such a row up, and save an untrained student."""

    def not_finite(table: np.ndarray) -> str:
        return listing(name for name, finite in zip(names, np.isfinite(table).all(axis=1)) if not finite)

    with np.errstate(over="ignore"):  # an overflow is refused below, by name
        rows = values.astype(dtype)
    if bad := not_finite(values):
        precision = cfg.trainer.precision
        overflow = "" if precision == "fp32" else f", or its forward overflows at trainer.precision={precision}"
        fix = "" if precision == "fp32" else ", or pass trainer.precision=fp32"
        raise FloatingPointError(
            f"the teacher's features of {bad} are not finite (NaN or inf) even in float32: the teacher's weights "
            f"hold NaN or inf{overflow}; check teacher.checkpoint{fix}"
        )
    if bad := not_finite(rows):
        raise FloatingPointError(
            f"the teacher's features of {bad} overflow {dtype} (the largest |value| is {np.abs(values).max():.4g}, "
            "float16 stops at 65504): pass --dtype float32"
        )
    return rows


def describe(
    cfg: TrainConfig, t: TeacherConfig, index: DatasetIndex, shape: tuple[int, int], dtype: str, arguments: list[str]
) -> dict:
    """meta.json: what the rows are (checked by CachedTeacher) and how they were made (for the reader); finish adds
    the checksums of the rows' blocks."""
    return {
        "dataset": samples_digest(index.samples),
        "content": index.content,
        "arguments": arguments,
        "root": str(index.root),
        "samples": shape[0],
        "dim": shape[1],
        "dtype": dtype,
        "teacher": {key: getattr(t, key) for key in (*TEACHER_KEYS, "checkpoint")},
        "view": {"resize": round(cfg.data.crop_size * 256 / 224), "center_crop": cfg.data.crop_size},
        "precision": cfg.trainer.precision,
        "commit": ckpt.git_commit(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
