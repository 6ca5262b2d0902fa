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
from fastreg.config import TeacherConfig, TrainConfig, to_config
from fastreg.distributed import seed_everything, setup_distributed
from fastreg.pipelines import dataset_index, eval_batches, samples_digest, shard_range
from fastreg.placement import Placement
from fastreg.teachers import build_teacher

log = logging.getLogger(__name__)
FEATURES, META = "features.npy", "meta.json"
# What must equal the run's teacher for its cache to stand in for it; the checkpoint path may move.
TEACHER_KEYS = ("arch", "format", "projection", "momentum_encoder")


# ---- reading: teacher.cache ----


class CachedTeacher(nn.Module):
    """A teacher whose features are a table: forward(positions (B,)) -> (B, D) float32, rows of the dataset index.
    The whole table is on the device, so a lookup is one gather (and a CUDA graph can capture it)."""

    def __init__(self, cfg: TeacherConfig, device: torch.device):
        super().__init__()
        self.path, self.name, self.arch = Path(cfg.cache), cfg.name or cfg.arch, cfg.arch
        self.meta = read_meta(self.path)
        for key in TEACHER_KEYS:
            if self.meta["teacher"][key] != getattr(cfg, key):
                raise ValueError(
                    f"teacher.cache={self.path} holds the features of a teacher with {key}={self.meta['teacher'][key]!r}, "
                    f"and this run's teacher {self.name!r} has {key}={getattr(cfg, key)!r}: cache this teacher "
                    "(python -m fastreg.cache_teacher) or set the teacher's keys to the cache's"
                )
        table = np.load(self.path / FEATURES, mmap_mode="r")  # (N, D)
        if table.shape != (self.meta["samples"], self.meta["dim"]):
            raise ValueError(f"{self.path / FEATURES} is {table.shape}, its meta.json says otherwise: write it again")
        self.dim = table.shape[1]
        self.features = load_table(table, device)  # (N, D); not a buffer: checkpoints do not carry it
        self.backbone_dtype = None
        log.info("teacher %s: %d cached %d-d features from %s", self.name, *table.shape, self.path)

    def check_dataset(self, digest: str | None) -> None:
        """The cache's rows are this run's dataset positions (the loader's samples digest), or training stops."""
        if digest != self.meta["dataset"]:
            raise ValueError(
                f"teacher.cache={self.path} was computed for {self.meta['samples']} images of {self.meta['root']}, "
                "and this run reads another list of images: its rows would be other images' features. Compute the "
                "cache again for this data (python -m fastreg.cache_teacher)"
            )

    def train(self, mode: bool = True) -> CachedTeacher:
        return super().train(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.features[positions.to(self.features.device)].float()


def load_table(table: np.ndarray, device: torch.device, rows: int = 65536) -> torch.Tensor:
    """The memory-mapped table on `device`, copied a block of rows at a time (no second host copy of it all)."""
    out = torch.empty(table.shape, dtype=getattr(torch, table.dtype.name), device=device)
    for start in range(0, len(table), rows):
        out[start : start + rows] = torch.from_numpy(np.array(table[start : start + rows]))
    return out


def read_meta(path: Path) -> dict:
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"teacher.cache={path}: no {META} there. Write the cache with python -m fastreg.cache_teacher {path} "
            "<the training overrides>"
        )
    return json.loads((path / META).read_text())


# ---- writing ----


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
    from hydra import compose, initialize_config_module

    with initialize_config_module("fastreg.configs", version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
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
    partial = out.with_name(out.name + ".partial")
    shape = (len(index.samples), teacher.dim)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
        partial.mkdir(parents=True)
        np.lib.format.open_memmap(partial / FEATURES, mode="w+", dtype=dtype, shape=shape).flush()
    barrier(world)
    table = np.load(partial / FEATURES, mmap_mode="r+")
    fill(table, teacher, cfg, index, (rank, world), place)
    table.flush()
    del table
    barrier(world)
    if rank == 0:
        meta = describe(cfg, t, index, shape, dtype)
        files.atomic_write(partial / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        files.sync(partial / FEATURES)
        partial.rename(out)
        files.sync(out.parent)
    barrier(world)
    return out


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
