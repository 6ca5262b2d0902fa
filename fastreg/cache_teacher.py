"""python -m fastreg.cache_teacher OUT [--teacher N] [--dtype float16|float32] [key=value ...]

SimReg's cached teacher (simreg.py --use_cache): the teacher's feature of every training image, computed once,
then looked up by the trainer (teacher.cache=OUT) instead of running the teacher at every step.

    for every image i of data.root's validated index:
        features[i] = teacher(center_crop(image_i))     # (D,); resize crop*256/224, center crop: the eval view
    OUT/features.npy   (N, D), a .npy that numpy memory-maps; row i is the index's sample i
    OUT/meta.json      the dataset's digest, the teacher, the view, the dtype: what teacher.cache checks

The official code loads a dict of one feature per file name, computed by a script it does not include. One
fixed feature per image can only come from a fixed view; the center crop is the deterministic view of its
(and CompRess's) evaluation, so that is the view cached here. The student trains on its own augmented views
against it, which SimReg's README reports as slightly below the online teacher for the same pair.

The key=value overrides compose the training config (experiment=..., data.root=..., teacher.checkpoint=...),
so the index, teacher and precision are the training run's. Under torchrun every rank computes the contiguous
shard DALI's reader gives it and writes its rows into one file (ranks on one machine, or a shared file system).
Everything is written into OUT.partial/ and renamed to OUT at the end: OUT is whole or absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastreg import checkpoint as ckpt
from fastreg import files
from fastreg.cached_teacher import FEATURES, META, TEACHER_KEYS
from fastreg.config import CACHE_REQUIRED, TeacherConfig, TrainConfig, to_config
from fastreg.distributed import agree_on_failure, seed_everything, setup_distributed
from fastreg.pipelines import dataset_index, eval_batches, samples_digest, shard_range
from fastreg.placement import Placement
from fastreg.teachers import build_teacher

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
        raw = compose("config", overrides=overrides)
    for teacher in [raw.teacher, *raw.teachers]:
        if teacher is not None and teacher.cache == CACHE_REQUIRED:
            teacher.cache = None
    cfg = to_config(raw)
    if cfg.demo or cfg.data.loader == "synthetic":
        raise ValueError("the cache needs a dataset: pass experiment=<name> (or experiment=none) and data.root=...")
    return cfg


def write_cache(cfg: TrainConfig, out: Path, teacher_index: int, dtype: str) -> Path:
    """Compute and write the cache of cfg.teachers[teacher_index]; every rank returns `out` once it is complete."""
    if out.exists():
        raise FileExistsError(f"{out} exists: delete it, or pass another folder")
    rank, world, device = setup_distributed(cfg.trainer.device)
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
    failure = None
    try:
        write_rows(partial, teacher, cfg, index, (rank, world), place)
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait for this one forever
        failure = e
    agree_on_failure(failure, world, f"write its rows into {partial}")
    if rank == 0:
        try:
            finish(partial, out, describe(cfg, t, index, shape, dtype), world)
        except Exception as e:  # noqa: BLE001 - as above
            failure = e
    agree_on_failure(failure, world, f"complete {out}")
    return out


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
        raise RuntimeError(
            f"rank(s) {missing} wrote their rows into another {partial}: the cache's folder must be on a file "
            "system every rank shares"
        )
    for r in range(world):
        (partial / f"rank{r}.done").unlink()
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
        table[done : done + len(features)] = features.cpu().numpy()
        done += len(features)
    if done != rows.stop:
        raise RuntimeError(f"the evaluation loader gave positions {rows.start}..{done}, expected ..{rows.stop}")
    log.info("rank %d: %d features in %.1f s", shard[0], len(rows), time.perf_counter() - start)


def describe(cfg: TrainConfig, t: TeacherConfig, index, shape: tuple[int, int], dtype: str) -> dict:
    """meta.json: what the rows are (checked by CachedTeacher) and how they were made (for the reader)."""
    return {
        "dataset": samples_digest(index.samples),
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
    try:
        cfg = compose_config(overrides)
        if not 0 <= args.teacher < len(cfg.teachers):
            raise ValueError(f"--teacher {args.teacher}: the config has {len(cfg.teachers)} teacher(s)")
        out = write_cache(cfg, args.out.expanduser().resolve(), args.teacher, args.dtype)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"teacher features written to {out}; train with teacher.cache={out}")


if __name__ == "__main__":
    main()
