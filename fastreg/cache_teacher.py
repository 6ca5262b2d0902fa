"""python -m fastreg.cache_teacher OUT [--teacher N] [--dtype float16|float32] [key=value ...]

SimReg's cached teacher (simreg.py --use_cache): the teacher's feature of every training image, computed once,
then looked up by the trainer (teacher.cache=OUT) instead of running the teacher at every step.

    for every image i of data.root's validated index:
        features[i] = teacher(center_crop(image_i))     # (D,); resize crop*256/224, center crop: the eval view
    OUT/features.npy   (N, D), a .npy that numpy memory-maps; row i is the index's sample i
    OUT/meta.json      the dataset's digests (names and labels; bytes) and root, the teacher, the view, the dtype,
                       a CRC-32 per 65,536 rows, this command's arguments: what teacher.cache checks

The official code loads a dict of one feature per file name, computed by a script it does not include. One
fixed feature per image can only come from a fixed view; the center crop is the deterministic view of its
(and CompRess's) evaluation, so that is the view cached here. The student trains on its own augmented views
against it, which SimReg's README reports as slightly below the online teacher for the same pair.

The key=value overrides compose the training config (experiment=..., data.root=..., teacher.checkpoint=...),
so the index, teacher and precision are the training run's. Under torchrun every rank computes the contiguous
shard DALI's reader gives it and writes its rows into one file (ranks on one machine, or a shared file system).
Everything is written into OUT.partial/ and renamed to OUT at the end: OUT is whole or absent. One writer at a
time: rank 0 holds OUT.lock (fastreg.lock) from before OUT is looked at until it is renamed. A feature that is not
finite, or overflows float16, is refused by image name before it is written (pass --dtype float32 for the latter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
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
from fastreg.teachers import build_teacher
from fastreg.train import USER_ERRORS

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("out", type=Path, help="the cache's folder; must not exist")
    parser.add_argument("--teacher", type=int, default=0, help="which of the config's teachers (default 0)")
    parser.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="float16 (default) halves the file"
    )
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if o.startswith("-") or "=" not in o]:
        parser.error(f"unknown argument(s) {bad}: after OUT and the flags come training overrides, key=value")
    return args, overrides


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
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
        partial.mkdir(parents=True)
        np.lib.format.open_memmap(partial / FEATURES, mode="w+", dtype=dtype, shape=shape).flush()
    barrier(world)
    try:
        agree(lambda: write_rows(partial, teacher, cfg, index, shard, place), world, f"write its rows into {partial}")
        meta = describe(cfg, t, index, shape, dtype, arguments)
        agree(lambda: finish(partial, out, meta, world) if rank == 0 else None, world, f"complete {out}")
    except BaseException:
        if rank == 0:  # every rank is past its writes: agree is a collective
            shutil.rmtree(partial, ignore_errors=True)
        raise


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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args, overrides = parse_args(argv)
    out = args.out.expanduser().resolve()
    arguments = ["--teacher", str(args.teacher), "--dtype", args.dtype, *overrides]  # after OUT, for meta.json
    try:
        cfg = compose_config(overrides)
        if not 0 <= args.teacher < len(cfg.teachers):
            raise ValueError(f"--teacher {args.teacher}: the config has {len(cfg.teachers)} teacher(s)")
        write_cache(cfg, out, args.teacher, args.dtype, arguments)
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as e:  # as fastreg.train: one line, exit 1
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = f"\n{e.__cause__}" if isinstance(e, HydraException) and e.__cause__ else ""  # as hydra prints it
        sys.exit(f"error: {e}{cause}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"teacher features written to {out}; train with teacher.cache={out}")


if __name__ == "__main__":
    main()
