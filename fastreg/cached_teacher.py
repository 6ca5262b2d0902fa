"""teacher.cache: a teacher whose features python -m fastreg.cache_teacher computed once, looked up per image.

    OUT/features.npy   (N, D) float16 or float32, row i the feature of the dataset index's sample i
    OUT/meta.json      the index's digest and root, N, D, the dtype, the teacher's keys, the view

The run binds the cache to its loader's dataset before the first step (bind_dataset): a cache of another list
of images is refused there, before its table is copied onto the device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastreg.config import TeacherConfig

log = logging.getLogger(__name__)
FEATURES, META = "features.npy", "meta.json"
# What must equal the run's teacher for its cache to stand in for it (the checkpoint is compared by file name:
# paths move between machines).
TEACHER_KEYS = ("arch", "format", "projection", "momentum_encoder")
DTYPES = ("float16", "float32")


class CachedTeacher(nn.Module):
    """forward(positions (B,)) -> (B, D) float32: the cached rows. The whole table sits on the device once bound,
    so a lookup is one gather (which a CUDA graph can capture)."""

    def __init__(self, cfg: TeacherConfig, key: str, device: torch.device):
        super().__init__()
        self.path, self.key, self.name, self.device = Path(cfg.cache), key, cfg.name or cfg.arch, device
        self.meta = read_meta(self.path, key)
        self.check_teacher(cfg)
        self.table = np.load(self.path / FEATURES, mmap_mode="r")  # (N, D), on disk until bound
        if self.table.shape != (self.meta["samples"], self.meta["dim"]) or self.table.dtype.name != self.meta["dtype"]:
            raise ValueError(
                f"{self.path / FEATURES} is {self.table.shape} {self.table.dtype}, and its {META} says "
                f"({self.meta['samples']}, {self.meta['dim']}) {self.meta['dtype']}: write the cache again"
            )
        self.dim = self.meta["dim"]
        self.features: torch.Tensor | None = None  # (N, D) on the device once bound; not a buffer: not checkpointed

    def check_teacher(self, cfg: TeacherConfig) -> None:
        cached = self.meta["teacher"]
        for name in TEACHER_KEYS:
            if cached[name] != getattr(cfg, name):
                raise ValueError(
                    f"{self.key}.cache={self.path} holds the features of a teacher with {name}={cached[name]!r}, and "
                    f"this run's teacher {self.name!r} has {name}={getattr(cfg, name)!r}: cache this teacher "
                    "(python -m fastreg.cache_teacher) or set the teacher's keys to the cache's"
                )
        if cfg.checkpoint not in (None, "random") and Path(cfg.checkpoint).name != Path(cached["checkpoint"]).name:
            raise ValueError(
                f"{self.key}.checkpoint={cfg.checkpoint} is not the checkpoint {self.key}.cache={self.path} was "
                f"computed from ({cached['checkpoint']}): a cached teacher needs no checkpoint; drop "
                f"{self.key}.checkpoint, or cache this one"
            )

    def bind_dataset(self, digest: str | None, root: str) -> None:
        """Check that the rows are this run's dataset positions (the loader's samples digest), then copy the
        table onto the device."""
        if digest != self.meta["dataset"]:
            raise ValueError(
                f"{self.key}.cache={self.path} was computed for {self.meta['samples']} images of {self.meta['root']}, "
                f"and this run reads another list of images of {root}: its rows would be other images' features. "
                "Compute the cache again for this data (python -m fastreg.cache_teacher)"
            )
        self.features = load_table(self.table, self.device)
        log.info("teacher %s: %d cached %d-d features from %s", self.name, *self.table.shape, self.path)

    def train(self, mode: bool = True) -> CachedTeacher:
        return super().train(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError(f"{self.key}.cache={self.path}: bind_dataset(...) first, with the loader's dataset")
        return self.features[positions.to(self.device)].float()


def load_table(table: np.ndarray, device: torch.device, rows: int = 65536) -> torch.Tensor:
    """The memory-mapped table on `device`, copied a block of rows at a time (no second host copy of it all)."""
    out = torch.empty(table.shape, dtype=getattr(torch, table.dtype.name), device=device)
    for start in range(0, len(table), rows):
        out[start : start + rows] = torch.from_numpy(np.array(table[start : start + rows]))
    return out


def read_meta(path: Path, key: str = "teacher") -> dict:
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{key}.cache={path}: no {META} there. Write the cache with python -m fastreg.cache_teacher {path} "
            "<the training overrides>"
        )
    meta = json.loads((path / META).read_text())
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{path / META} gives dtype {meta.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    return meta
