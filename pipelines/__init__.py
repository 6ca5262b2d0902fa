"""Data pipelines. One front, `build_loader`, picks the loader named by `data.loader`.

Every training loader has the same shape: `len(loader)` batches per epoch, and `loader.epoch(e)`
yields (images, labels) already on the training device, images (B, 3, H, W) float in `memory_format`
(channels_last unless trainer.channels_last=false). `state_dict()` is what a checkpoint must hold to
continue with the same samples. The trainer and the Distiller never know which loader runs.

Evaluation batches come from `eval_batches`: every image once, in order, center crop, no flip.
"""

from __future__ import annotations

import importlib
import logging
from typing import Iterable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from fastreg.config import DataConfig

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Loader(Protocol):
    name: str

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict: ...


def resolve_loader(kind: str) -> str:
    """data.loader: auto means dali when DALI can be imported; otherwise torchvision, saying why."""
    if kind not in ("auto", "dali"):
        return kind
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as e:
        if kind == "dali":
            raise ImportError(f"data.loader=dali but DALI cannot be imported ({e}): pip install nvidia-dali-cuda130 "
                              "(or nvidia-dali-cuda120 for CUDA 12), or use data.loader=torchvision") from e
        log.warning("data.loader=auto: DALI cannot be imported (%s); using the torchvision loader, which decodes "
                    "with PIL on the CPU and is much slower. Install nvidia-dali-cuda130 to fix.", e)
        return "torchvision"
    return "dali"


def dataset_index(cfg: DataConfig, rank: int, world_size: int, progress: bool = True):
    """The validated file list of data.root; rank 0 builds it (decode-checks every image), the others
    then read the cache, so no two processes write it at once."""
    from fastreg.index import load_index

    def load():
        return load_index(cfg.root, file_list=cfg.file_list, max_bad_fraction=cfg.max_bad_fraction,
                          progress=progress and rank == 0)

    if world_size == 1 or not dist.is_initialized():
        return load()
    index = load() if rank == 0 else None
    dist.barrier()
    return index or load()


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int, device: torch.device,
                 memory_format: torch.memory_format = torch.channels_last,
                 checkpoint: Optional[dict] = None) -> Loader:
    """The training loader of data.loader; `checkpoint` is a state_dict() of the same loader to continue from."""
    kind = resolve_loader(cfg.loader)
    if kind == "synthetic":
        from fastreg.pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, seed=seed + rank, device=device, memory_format=memory_format)
    if kind == "dali":
        from fastreg.pipelines.dali import DaliLoader, Shard

        return DaliLoader(cfg, dataset_index(cfg, rank, world_size), shard=Shard(rank, world_size), seed=seed,
                          device=device, memory_format=memory_format, checkpoint=checkpoint)
    if cfg.augment == "strong":
        raise ValueError("data.augment=strong is built with DALI ops, and DALI cannot be imported here")
    from fastreg.pipelines.torchvision import TorchvisionLoader

    return TorchvisionLoader(cfg, rank=rank, world_size=world_size, seed=seed, device=device,
                             memory_format=memory_format)


def eval_batches(kind: str, root: str, crop_size: int, batch_size: int, workers: int,
                 device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of every image of the ImageFolder `root` once, in order; `.classes` names the labels.
    DALI batches are already on `device`; torchvision's are on the CPU."""
    if resolve_loader(kind) == "dali":
        from fastreg.pipelines.dali import dali_eval_loader

        return dali_eval_loader(root, crop_size, batch_size, workers, device)
    from fastreg.pipelines.torchvision import eval_loader

    return eval_loader(root, crop_size, batch_size, workers)
