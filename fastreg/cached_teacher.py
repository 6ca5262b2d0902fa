"""teacher.cache: a teacher whose features python -m fastreg.cache_teacher computed once, looked up per image.

    OUT/features.npy   (N, D) float16 or float32, row i the feature of the dataset index's sample i
    OUT/meta.json      the index's digests (of the names and labels; of the bytes) and root, N, D, the dtype, a
                       CRC-32 per block of rows of features.npy, the teacher's keys, the view, the arguments
                       that wrote it (after OUT)

Nothing in the cache is trusted before it is checked. meta.json's keys and types (read_meta); features.npy's
header, parsed here, its dtype, shape and size against meta.json (open_table); the run's dataset against the
cache's, by content, not only by names (bind_dataset); every block of rows against its CRC-32, and every value
for being finite, as the table is copied onto the device (load_table, which reads every byte anyway). Each
refusal is one line naming the file and the command that writes the cache again.
"""

from __future__ import annotations

import json
import logging
import shlex
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastreg.config import TeacherConfig
from fastreg.index import DatasetIndex
from fastreg.messages import listing
from fastreg.pipelines import samples_digest

log = logging.getLogger(__name__)
FEATURES, META = "features.npy", "meta.json"
# What must equal the run's teacher for its cache to stand in for it (the checkpoint is compared by file name:
# paths move between machines).
TEACHER_KEYS = ("arch", "format", "projection", "momentum_encoder", "feature", "input_size")
# Teacher keys that caches written before them lack, read as the one value they could have had then: a ViT's
# class token, at the crop's size.
TEACHER_KEYS_ADDED = {"feature": "cls", "input_size": None}
DTYPES = ("float16", "float32")
# meta.json's keys that a reader relies on, with their types.
META_KEYS = {
    "dataset": str,
    "content": str,
    "root": str,
    "samples": int,
    "dim": int,
    "dtype": str,
    "teacher": dict,
    "checksums": dict,
    "arguments": list,
}
JSON_TYPES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}
# Rows per CRC-32 of features.npy: ImageNet's 1.28M rows at 2048-d float16 are 20 blocks of 256 MB. A CRC-32 (as
# a zip's, as checkpoints') finds damage, not tampering; at 1.1 GB/s it adds a few seconds to the load.
BLOCK_ROWS = 65536


class CachedTeacher(nn.Module):
    """forward(positions (B,)) -> (B, D) float32: the cached rows. The whole table sits on the device once bound,
    so a lookup is one gather (which a CUDA graph can capture)."""

    def __init__(self, cfg: TeacherConfig, key: str, device: torch.device):
        super().__init__()
        self.path, self.key, self.name, self.device = Path(cfg.cache), key, cfg.name or cfg.arch, device
        self.meta = read_meta(self.path, key)
        self.check_teacher(cfg)
        self.table = open_table(self.path, self.meta)  # (N, D), on disk until bound
        self.dim = self.meta["dim"]
        self.features: torch.Tensor | None = None  # (N, D) on the device once bound; not a buffer: not checkpointed

    def check_teacher(self, cfg: TeacherConfig) -> None:
        cached = self.meta["teacher"]
        for name in TEACHER_KEYS:
            if cached[name] != getattr(cfg, name):
                raise ValueError(
                    f"{self.key}.cache={self.path} holds the features of a teacher with {name}={cached[name]!r}, and "
                    f"this run's teacher {self.name!r} has {self.key}.{name}={getattr(cfg, name)!r}: cache this "
                    "teacher (python -m fastreg.cache_teacher) or set the teacher's keys to the cache's"
                )
        if cfg.checkpoint not in (None, "random") and Path(cfg.checkpoint).name != Path(cached["checkpoint"]).name:
            raise ValueError(
                f"{self.key}.checkpoint={cfg.checkpoint} is not the checkpoint {self.key}.cache={self.path} was "
                f"computed from ({cached['checkpoint']}): a cached teacher needs no checkpoint; drop "
                f"{self.key}.checkpoint, or cache this one"
            )

    def bind_dataset(self, index: DatasetIndex | None) -> None:
        """Check that the rows are the features of this run's images, position by position (the index's names and
        labels, then its content digest: the bytes), then copy the table onto the device."""
        meta, cached = self.meta, f"{self.key}.cache={self.path} was computed for {self.meta['samples']} images"
        if index is None:
            raise ValueError(f"{cached} of {meta['root']}, and this run reads no images (data.loader=synthetic)")
        folder = "the same folder" if str(index.root) == meta["root"] else "another folder than the cache's"
        if samples_digest(index.samples) != meta["dataset"]:
            differs = f"another list of images ({len(index.samples)} images, or other names or labels)"
        elif index.content != meta["content"]:
            differs = "the same file names and labels, but other bytes (images replaced, or changed in place)"
        else:
            differs = None
        if differs is not None:
            raise ValueError(
                f"{cached} of {meta['root']}, and this run reads {differs} in {index.root}, {folder}: its rows would "
                "be other images' features. Write a cache for this data (python -m fastreg.cache_teacher NEW_OUT "
                "<this run's overrides>), or point data.root at the images the cache was written for"
            )
        if str(index.root) != meta["root"]:
            log.info(
                "%s: written for %s, read here from %s: the same images, byte for byte",
                self.path,
                meta["root"],
                index.root,
            )
        self.features = load_table(self.table, self.device, self.path, self.meta)
        log.info("teacher %s: %d cached %d-d features from %s", self.name, *self.table.shape, self.path)

    def train(self, mode: bool = True) -> CachedTeacher:
        return super().train(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError(f"{self.key}.cache={self.path}: bind_dataset(...) first, with the loader's dataset")
        return self.features[positions.to(self.device)].float()


def rewrite(out: Path, meta: dict | None) -> str:
    """The fix for a damaged cache: the command that wrote it (meta.json keeps its arguments), after deleting it."""
    arguments = (meta or {}).get("arguments")
    command = f"python -m fastreg.cache_teacher {shlex.quote(str(out))} <the training overrides>"
    if isinstance(arguments, list) and all(isinstance(a, str) for a in arguments):
        command = shlex.join(["python", "-m", "fastreg.cache_teacher", str(out), *arguments])
    return f"delete {out} and write it again: {command}"


def block_checksums(table: np.ndarray, rows: int = BLOCK_ROWS) -> dict:
    """meta.json's "checksums": the CRC-32 of the bytes of each block of `rows` rows of the (N, D) table."""
    return {"block_rows": rows, "crc32": [zlib.crc32(table[i : i + rows]) for i in range(0, len(table), rows)]}


def load_table(table: np.ndarray, device: torch.device, out: Path, meta: dict) -> torch.Tensor:
    """The memory-mapped table on `device`, copied a block of rows at a time (no second host copy of it all), each
    block checked against its CRC-32 in meta.json and for NaN and inf, which would make every step that looks
    such a row up non-finite (and skipped)."""
    result = torch.empty(table.shape, dtype=getattr(torch, table.dtype.name), device=device)
    rows, crcs = meta["checksums"]["block_rows"], meta["checksums"]["crc32"]
    for block, start in enumerate(range(0, len(table), rows)):
        values = np.array(table[start : start + rows])  # (rows, D): read from the disk once, checked, copied
        where = f"{out / FEATURES}, rows {start}..{start + len(values) - 1} (block {block} of {len(crcs)})"
        if zlib.crc32(values) != crcs[block]:
            raise ValueError(
                f"{where}: the bytes do not match their CRC-32 in {META}: the file was damaged or changed after it "
                f"was written; {rewrite(out, meta)}"
            )
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            bad = listing(str(start + i) for i in np.flatnonzero(~finite))
            # float16 stops at 65504: a float32 cache holds what overflowed it
            wider = {**meta, "arguments": ["float32" if a == "float16" else a for a in meta["arguments"]]}
            raise ValueError(f"{where}: NaN or inf in row(s) {bad}; {rewrite(out, wider)}")
        result[start : start + len(values)] = torch.from_numpy(values)
    return result


def read_meta(path: Path, key: str = "teacher") -> dict:
    """meta.json, once its keys and their types are as a reader needs them."""
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{key}.cache={path}: no {META} there. Write the cache with python -m fastreg.cache_teacher {path} "
            "<the training overrides>"
        )
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path / META} is not readable JSON ({e}): it is cut short or damaged; {rewrite(path, None)}"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / META} holds a {type(meta).__name__}, not a JSON object; {rewrite(path, None)}")
    fix = rewrite(path, meta)
    if missing := [name for name in META_KEYS if name not in meta]:
        raise ValueError(f"{path / META} lacks {', '.join(missing)}: it is damaged, or older than this fastreg; {fix}")
    for name, kind in META_KEYS.items():
        if not isinstance(meta[name], kind):
            raise ValueError(f"{path / META}: {name} is {meta[name]!r}, not {JSON_TYPES[kind]}; {fix}")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{path / META} gives dtype {meta['dtype']!r}, not one of {', '.join(DTYPES)}; {fix}")
    meta["teacher"] = {**TEACHER_KEYS_ADDED, **meta["teacher"]}
    if missing := [name for name in (*TEACHER_KEYS, "checkpoint") if name not in meta["teacher"]]:
        raise ValueError(f"{path / META}: its teacher lacks {', '.join(missing)}; {fix}")
    checksums, blocks = meta["checksums"], None
    if isinstance(checksums.get("block_rows"), int) and checksums["block_rows"] > 0:
        blocks = -(-meta["samples"] // checksums["block_rows"])  # ceil(N / block_rows)
    crcs = checksums.get("crc32")
    if blocks is None or not isinstance(crcs, list) or len(crcs) != blocks:
        raise ValueError(f"{path / META}: its checksums do not describe {meta['samples']} rows; {fix}")
    return meta


def open_table(path: Path, meta: dict) -> np.memmap:
    """features.npy as a read-only memory map, once its header and size agree with meta.json.

    The header is parsed here, not by np.load: numpy's errors name no file ("mmap length is greater than file
    size", an EOFError), and for a header whose dtype became object they advise allow_pickle=True, which would
    let the file run code. An object dtype is refused here without a word of that."""
    file, fix = path / FEATURES, rewrite(path, meta)
    shape, dtype = (meta["samples"], meta["dim"]), np.dtype(meta["dtype"])
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f) if size else None
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            header = read_header[version](f) if version in read_header else None
            offset = f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} does not exist; {fix}") from None
    except ValueError:  # not the .npy magic string, or a header numpy cannot parse
        header = None
    if not size:
        raise ValueError(f"{file} is empty (0 bytes); {fix}")
    if header is None:
        raise ValueError(f"{file} has no readable .npy header: it is damaged, or not a .npy file; {fix}")
    found_shape, fortran, found_dtype = header
    if found_dtype.hasobject or found_dtype != dtype or fortran or found_shape != shape:
        found = f"a {'Fortran-order ' if fortran else ''}{found_shape} {found_dtype} table"
        raise ValueError(f"{file} holds {found}, and its {META} says {shape} {dtype}; {fix}")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size != expected:
        cut = "cut short" if size < expected else "longer than its table"
        raise ValueError(f"{file} is {size} bytes, and its {shape} {dtype} table needs {expected}: it is {cut}; {fix}")
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
