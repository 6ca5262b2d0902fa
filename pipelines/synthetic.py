"""Synthetic on-device batches: the model's compute alone, with no decoding or transfer."""

from __future__ import annotations

from typing import Iterator

import torch

from fastreg.config import DataConfig


class SyntheticLoader:
    name = "synthetic"

    def __init__(self, cfg: DataConfig, *, seed: int, device: torch.device, memory_format: torch.memory_format):
        g = torch.Generator().manual_seed(seed)
        b, s = cfg.batch_size, cfg.crop_size
        images = torch.randn(b, 3, s, s, generator=g)  # already "normalized": zero mean, unit std
        self.images = images.to(device).contiguous(memory_format=memory_format)
        self.labels = torch.randint(0, cfg.synthetic_classes, (b,), generator=g).to(device)
        self.batches = cfg.synthetic_batches

    def __len__(self) -> int:
        return self.batches

    def state_dict(self) -> dict:
        return {"loader": self.name}

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            yield self.images, self.labels
