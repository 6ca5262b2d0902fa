"""Data pipelines. One front, `build_loader`, picks the loader named by `data.loader`.

Every training loader has the same shape: `len(loader)` batches per epoch, and `loader.epoch(e)`
yields `Batch`es already on the training device, images (B, 3, H, W) float in `memory_format`
(channels_last unless trainer.channels_last=false). `state_dict()` is what a checkpoint must hold to
continue with the same samples. The trainer and the Distiller never know which loader runs.

Evaluation batches come from `eval_batches`: every image once, in order, center crop, no flip.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from fastreg.config import DataConfig
from fastreg.distributed import agree_on_failure
from fastreg.seeding import mix_seed

if TYPE_CHECKING:
    from fastreg.index import DatasetIndex

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    """One training batch on the training device."""

    images: torch.Tensor  # (B, 3, H, W): the student's view; the teachers' too unless teacher_images is set
    labels: torch.Tensor  # (B,) int64 class labels; training does not use them
    indices: torch.Tensor  # (B,) int64 positions in the dataset index: the rows of teacher.cache
    teacher_images: torch.Tensor | None = None  # (B, 3, H, W) data.teacher_view=weak: the teachers' view
    patches: torch.Tensor | None = None  # (B * P, 3, p, p) data.small_patches=P: image b's patches at b*P .. b*P+P-1

    @property
    def teacher_view(self) -> torch.Tensor:
        """What the teachers see: the weak view of the student's crop, or the student's own view."""
        return self.images if self.teacher_images is None else self.teacher_images

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class Loader(Protocol):
    name: str
    index: DatasetIndex | None  # the checked files it reads (a cached teacher binds to it); None for synthetic data
    identity: dict  # what a saved position belongs to: the loader, its samples' digest, shards, batch size
    position: tuple[int, int]  # (epoch, batches of it done): where the next batch comes from

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...


def usable_state(checkpoint: dict | None, identity: dict, *, order_has_state: bool) -> dict | None:
    """A loader's saved state, if a loader with the same identity (name, files, world size, batch size)
    saved it: a position means nothing to another one. Otherwise None, with a warning where something is
    lost: always for a loader whose order has state (DALI's shuffle), else only inside an epoch (the
    trainer then refuses to resume there)."""
    if checkpoint is None:
        return None
    changed = [k for k, v in identity.items() if checkpoint.get(k) != v]
    if not changed:
        return checkpoint
    if order_has_state or checkpoint.get("batch"):
        log.warning(
            "the checkpoint's data position was saved with another %s: the %s loader cannot continue from it",
            ", ".join(changed),
            identity["loader"],
        )
    return None


def dataset_identity(name: str, index: DatasetIndex, num_shards: int, batch_size: int, batches: int) -> dict:
    """A dataset loader's identity (see usable_state), once `batches` per epoch is checked to be at least one."""
    if batches == 0:
        raise ValueError(
            f"{index.root} has {len(index.samples)} usable images: fewer than one batch of {batch_size} per process "
            f"across {num_shards} process(es); lower data.batch_size"
        )
    return {
        "loader": name,
        "dataset": samples_digest(index.samples),
        "num_shards": num_shards,
        "batch_size": batch_size,
    }


def samples_digest(samples: Iterable[tuple[str, int]]) -> str:
    """Identity of a list of (path, label): a saved position means nothing on another list."""
    h = hashlib.sha1()
    for path, label in samples:
        h.update(f"{path}\0{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def resolve_loader(kind: str) -> str:
    """data.loader: auto means dali when DALI can be imported; otherwise torchvision, saying why."""
    if kind not in ("auto", "dali"):
        return kind
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as e:
        if kind == "dali":
            raise ImportError(
                f"data.loader=dali but DALI cannot be imported ({e}): pip install nvidia-dali-cuda130 "
                "(or nvidia-dali-cuda120 for CUDA 12), or use data.loader=torchvision"
            ) from e
        log.warning(
            "data.loader=auto: DALI cannot be imported (%s); using the torchvision loader, which decodes "
            "with PIL on the CPU and is much slower. Install nvidia-dali-cuda130 to fix.",
            e,
        )
        return "torchvision"
    return "dali"


@contextmanager
def files_named(index: DatasetIndex, stopped_by: Callable[[Exception], str | None]) -> Iterator[None]:
    """A loader stopped by a file that changed after the index checked it (rewritten, corrupted, removed, made
    unreadable): every rerun on the same index would stop the same way, and DALI names no file. So the index's files
    are checked again, the index is updated to leave the bad ones out, and the error raised names them and the
    command that re-checks the folder (fastreg.index.recheck_after_failure). Costs nothing until a loader fails.

    stopped_by(error): the reader as the message names it ("the DALI pipeline (nvImageCodec failure: '#3')"), or
    None for an error that no file causes, raised as it is. So is the loader's own error when every file still
    passes the check."""
    try:
        yield
    except Exception as e:
        reader = stopped_by(e)
        if reader is None:
            raise
        from fastreg.index import recheck_after_failure

        error = recheck_after_failure(index, reader)
        if error is None:
            raise
        raise error from e


def checked_batches(batches: Iterator, index: DatasetIndex, stopped_by: Callable[[Exception], str | None]) -> Iterator:
    """The items of `batches`, each taken inside files_named(index, stopped_by)."""
    while True:
        with files_named(index, stopped_by):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def dataset_index(cfg: DataConfig, rank: int, world_size: int):
    """The validated file list of data.root, which every training loader reads. The first process of each
    machine builds it (decode-checks every image; the cache may not be shared between machines) while the
    others wait, then they read the cache. An error on a builder is raised on every rank, so none waits
    forever."""
    from fastreg.index import load_index

    def load(progress: bool):
        return load_index(cfg.root, file_list=cfg.file_list, max_bad_fraction=cfg.max_bad_fraction, progress=progress)

    if world_size == 1 or not dist.is_initialized():
        return load(progress=True)
    builder = int(os.environ.get("LOCAL_RANK", rank)) == 0
    failure = None
    if builder:
        try:
            index = load(progress=rank == 0)
        except Exception as e:  # noqa: BLE001 - any failure must reach the waiting ranks, or they hang
            failure = e
    agree_on_failure(failure, world_size, f"index {cfg.root}")
    if not builder:
        index_log = logging.getLogger("fastreg.index")
        level = index_log.level
        index_log.setLevel(logging.ERROR)  # the builder has warned about the bad files already
        try:
            index = load(progress=False)
        finally:
            index_log.setLevel(level)
    return index


def build_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.channels_last,
    half: bool = True,
    checkpoint: dict | None = None,
) -> Loader:
    """The training loader of data.loader. `half`: float16 images where that is fast (DALI on a GPU), for
    runs under autocast; `checkpoint`: a state_dict() of the same loader to continue from."""
    kind = resolve_loader(cfg.loader)
    if kind == "synthetic":
        from fastreg.pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(
            cfg,
            seed=mix_seed("synthetic", seed, rank),
            device=device,
            memory_format=memory_format,
            checkpoint=checkpoint,
        )
    if kind == "dali":
        from fastreg.pipelines.dali import DaliLoader, Shard

        return DaliLoader(
            cfg,
            dataset_index(cfg, rank, world_size),
            shard=Shard(rank, world_size),
            seed=seed,
            device=device,
            memory_format=memory_format,
            half=half,
            checkpoint=checkpoint,
        )
    dali_only = {
        "data.augment": cfg.augment != "weak",
        "data.teacher_view": cfg.teacher_view != "same",
        "data.small_patches": cfg.small_patches > 0,
    }
    if wanted := [key for key, on in dali_only.items() if on]:
        raise ValueError(f"{', '.join(wanted)} is built with DALI ops, and DALI cannot be imported here")
    from fastreg.pipelines.pil_folder import TorchvisionLoader

    return TorchvisionLoader(
        cfg,
        dataset_index(cfg, rank, world_size),
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        memory_format=memory_format,
        checkpoint=checkpoint,
    )


def shard_range(samples: int, rank: int, world_size: int) -> range:
    """The positions an evaluation shard reads: rank r of W takes [N r // W, N (r + 1) // W), DALI's split."""
    return range(samples * rank // world_size, samples * (rank + 1) // world_size)


def eval_batches(
    kind: str,
    root: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
    **index_options,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of every image of the ImageFolder `root` once, in order; `.classes` names the labels.
    shard = (rank, world size): only the positions shard_range gives that rank. DALI batches are already on
    `device` (float16 on a GPU); torchvision's are float32 on the CPU. index_options (file_list,
    max_bad_fraction, progress, key: the config key that gave `root`) go to the dataset index that both read."""
    if resolve_loader(kind) == "dali":
        from fastreg.pipelines.dali import dali_eval_loader

        return dali_eval_loader(root, crop_size, batch_size, workers, device, shard, **index_options)
    from fastreg.pipelines.pil_folder import eval_loader

    return eval_loader(root, crop_size, batch_size, workers, shard, **index_options)
