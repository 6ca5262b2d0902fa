"""Synthetic on-device batches: the model's compute alone, with no decoding or transfer."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastreg.config import DataConfig
from fastreg.pipelines import Batch, usable_state


class SyntheticLoader:
    name = "synthetic"
    index = None  # no files

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int,
        device: torch.device,
        memory_format: torch.memory_format,
        checkpoint: dict | None = None,
    ):
        g = torch.Generator().manual_seed(seed)
        b, s = cfg.batch_size, cfg.crop_size

        def random_images(*shape: int) -> torch.Tensor:  # already "normalized": zero mean, unit std
            return torch.randn(*shape, generator=g).to(device).contiguous(memory_format=memory_format)

        self.images = random_images(b, 3, s, s)
        labels = torch.randint(0, cfg.synthetic_classes, (b,), generator=g).to(device)
        # data.teacher_view=weak and data.small_patches: their tensors too, drawn after the images and labels
        # (which stay as they were without them), so that the benchmark times those modes' compute.
        teacher_images = random_images(b, 3, s, s) if cfg.teacher_view == "weak" else None
        p = cfg.small_patch_size
        patches = random_images(b * cfg.small_patches, 3, p, p) if cfg.small_patches else None
        indices = torch.arange(b, device=device)
        # one batch, every step
        self.batch = Batch(self.images, labels, indices, teacher_images=teacher_images, patches=patches)
        self.batches = cfg.synthetic_batches
        self.identity = {"loader": self.name, "batches": self.batches}
        state = usable_state(checkpoint, self.identity, order_has_state=False)
        self.position = (state["epoch"], state["batch"]) if state else (0, 0)

    def __len__(self) -> int:
        return self.batches

    def state_dict(self) -> dict:
        return {**self.identity, "epoch": self.position[0], "batch": self.position[1]}

    def epoch(self, epoch: int) -> Iterator[Batch]:
        skip = self.position[1] if epoch == self.position[0] else 0
        for done in range(skip + 1, self.batches + 1):
            self.position = (epoch, done) if done < self.batches else (epoch + 1, 0)
            yield self.batch
