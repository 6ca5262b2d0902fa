"""The reference loader: PIL decode, torchvision transforms, DataLoader workers (SimReg's own pipeline).

It reads the files of fastreg.index's validated list, as the DALI loader does: the same samples, in
ImageFolder's order and labels, without the corrupt, truncated or unreadable files, which would otherwise
stop a DataLoader worker mid-epoch. A file that PIL cannot read any more (it changed after the index checked it)
stops the loader with the error that names it and the command that re-checks the folder, and the index leaves it
out from then on (fastreg.pipelines.files_named), as with DALI. Every file is decoded by PIL and converted to RGB, whatever its format
(JPEG, CMYK JPEG, PNG, ...). Training views are SimReg's weak augmentation:
RandomResizedCrop(scale=data.scale) + horizontal flip.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import pil_loader

from fastreg.config import DataConfig
from fastreg.index import DatasetIndex, load_index
from fastreg.pipelines import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    checked_batches,
    dataset_identity,
    shard_range,
    usable_state,
)
from fastreg.seeding import mix_seed


class UnreadableImage(OSError):
    """A file of the index that PIL cannot read now: it changed after the index checked it. From a DataLoader worker
    it comes back as the same type, with the worker's traceback as its message."""


class IndexedImages(Dataset):
    """(transform(image), label) of every file in a validated index, decoded by PIL as ImageFolder does."""

    def __init__(self, index: DatasetIndex, transform: T.Compose):
        self.index, self.transform = index, transform
        self.root, self.classes, self.samples = index.root, index.classes, index.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.root / self.samples[i][0], self.samples[i][1]
        try:
            # pil_loader, not default_loader: the latter reads with accimage (JPEG only) when that backend is set
            image = pil_loader(str(path))
        except Exception as e:  # PIL raises many types on a damaged file (fastreg.index.check_bytes)
            raise UnreadableImage(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}") from e
        return self.transform(image), label


def stopped_by_a_file(error: Exception) -> str | None:
    """The reader, for files_named, when PIL could not read a file of the index; None for any other error."""
    return "the torchvision loader" if isinstance(error, UnreadableImage) else None


class IndexedLoader(DataLoader):
    """A DataLoader of IndexedImages (or a Subset or SeededViews of them) whose batches come through files_named: a file
    that PIL cannot read any more stops it with the error that names it."""

    def __init__(self, index: DatasetIndex, dataset: Dataset, **options: Any):
        super().__init__(dataset, **options)
        self.index = index

    def __iter__(self) -> Iterator:
        return checked_batches(super().__iter__(), self.index, stopped_by_a_file)


def train_transform(cfg: DataConfig) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(crop_size: int) -> T.Compose:
    """Resize 256, center crop 224 (scaled for other crop sizes)."""
    return T.Compose(
        [
            T.Resize(round(crop_size * 256 / 224)),
            T.CenterCrop(crop_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_loader(
    root: str, crop_size: int, batch_size: int, workers: int, shard: tuple[int, int] = (0, 1), **index_options
) -> IndexedLoader:
    """Every validated image once (or those of shard = (rank, world size)), in order, no augmentation: k-NN, the
    linear probe, eval during training, the teacher cache. index_options go to fastreg.index.load_index."""
    ds = IndexedImages(load_index(root, **index_options), eval_transform(crop_size))
    loader = IndexedLoader(
        ds.index,
        Subset(ds, shard_range(len(ds), *shard)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    loader.classes = ds.classes
    return loader


class SeededViews(Dataset):
    """Sample i's augmented view in epoch e is a function of (seed, e, i) alone.

    So the views do not depend on the worker count, the rank or the order, and a run resumed at an epoch
    boundary sees exactly what the uninterrupted run saw. The global RNG is left untouched.
    """

    def __init__(self, dataset: IndexedImages, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        """(view, label, i)"""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed("views", self.seed, self.epoch, i, bits=63))
            return *self.dataset[i], i


class TorchvisionLoader:
    name = "torchvision"

    def __init__(
        self,
        cfg: DataConfig,
        index: DatasetIndex,
        *,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        memory_format: torch.memory_format,
        checkpoint: dict | None = None,
    ):
        self.index = index
        self.dataset = SeededViews(IndexedImages(index, train_transform(cfg)), seed)
        # Each rank reads a disjoint 1/world_size of a per-epoch permutation; drop_last keeps ranks in step.
        self.sampler = DistributedSampler(self.dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        self.cfg, self.device, self.memory_format = cfg, device, memory_format
        self.identity = dataset_identity(self.name, index, world_size, cfg.batch_size, len(self))
        state = usable_state(checkpoint, self.identity, order_has_state=False)
        self.position = (state["epoch"], state["batch"]) if state else (0, 0)

    def __len__(self) -> int:
        return len(self.sampler) // self.cfg.batch_size

    def state_dict(self) -> dict:
        """The position alone: an epoch's order and views are functions of (seed, epoch, sample)."""
        return {**self.identity, "epoch": self.position[0], "batch": self.position[1]}

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches, after those already trained on when resumed inside it."""
        skip = self.position[1] if epoch == self.position[0] else 0
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch  # workers are started below, so they copy this epoch
        order = list(self.sampler)[skip * self.cfg.batch_size :]  # this rank's samples still to come
        # Its own generator for the workers' base seed, which DataLoader otherwise draws from the global torch
        # RNG: a run resumed inside the epoch starts this iterator later than the uninterrupted run did, and
        # that draw would shift every random op after it (dropout, stochastic depth).
        generator = torch.Generator().manual_seed(mix_seed("worker seeds", self.dataset.seed, epoch, bits=63))
        loader = IndexedLoader(
            self.index,
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=order,
            drop_last=True,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            generator=generator,
        )
        for done, (images, labels, indices) in enumerate(loader, skip + 1):
            self.position = (epoch, done) if done < len(self) else (epoch + 1, 0)
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield Batch(images, *(t.to(self.device, non_blocking=True) for t in (labels, indices)))
