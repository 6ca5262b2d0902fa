"""Data pipelines. One front, `build_loader`, picks the loader named by `data.loader`.

Every training loader has the same shape: `len(loader)` batches per epoch, and `loader.epoch(e)`
yields (images, labels) already on the training device, images (B, 3, H, W) float in `memory_format`
(channels_last unless trainer.channels_last=false).
The trainer and the Distiller never know which loader runs.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from fastreg.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Loader(Protocol):
    name: str

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int, device: torch.device,
                 memory_format: torch.memory_format = torch.channels_last) -> Loader:
    if cfg.loader == "synthetic":
        from fastreg.pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, seed=seed + rank, device=device, memory_format=memory_format)
    from fastreg.pipelines.torchvision import TorchvisionLoader

    return TorchvisionLoader(cfg, rank=rank, world_size=world_size, seed=seed, device=device,
                             memory_format=memory_format)
