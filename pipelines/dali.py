"""NVIDIA DALI pipelines: JPEG decode on the GPU (nvJPEG + the hardware decoder) or on the CPU.

Training yields ONE weakly augmented view per image (SimReg): the same tensor feeds every teacher and
the student. On a GPU, `decoders.image_random_crop(device="mixed")` decodes only the crop's region;
`crop_mirror_normalize(output_layout="HWC")` writes an NHWC buffer, and the NCHW view of it that the
trainer receives is already channels_last, without a copy.

The file list comes from `fastreg.index`, which decode-checks every image first: one corrupt JPEG
would otherwise kill the whole pipeline ("Critical error in pipeline", DALI cannot skip samples).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fastreg.config import DataConfig
from fastreg.index import DatasetIndex, load_index
from fastreg.pipelines import IMAGENET_MEAN, IMAGENET_STD, samples_digest, usable_state

log = logging.getLogger(__name__)
READER = "reader"  # the iterator finds epoch size and shard geometry through the reader's name
MEAN = [255 * m for m in IMAGENET_MEAN]  # crop_mirror_normalize works on 0..255 pixels
STD = [255 * s for s in IMAGENET_STD]
# The mixed decoder's memory, sized once for ImageNet's largest JPEG (DALI's ResNet-50 example): its
# pools only grow, and growing them mid-epoch stalls the pipeline.
MIXED_DECODER_MEMORY = dict(device_memory_padding=211025920, host_memory_padding=140544512,
                            preallocate_width_hint=5980, preallocate_height_hint=6430)


@dataclass(frozen=True)
class Shard:
    """Which part of the dataset this process reads: shard_id = global rank, num_shards = world size."""
    shard_id: int = 0
    num_shards: int = 1


def read_files(index: DatasetIndex, shard: Shard, *, shuffle: bool, seed: int):
    """JPEG bytes and labels of the validated files. Training reshuffles the entire dataset every epoch
    with a seed shared by all ranks, so the shards partition one permutation (each sample at most once per
    epoch); pad_last_batch gives every shard's pass the same length (DaliLoader never trains on the pad)."""
    shuffling = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed) if shuffle else {}
    jpegs, labels = fn.readers.file(
        file_root=str(index.root), file_list=str(index.file_list), shard_id=shard.shard_id,
        num_shards=shard.num_shards, pad_last_batch=True, name=READER, **shuffling,
    )
    return jpegs, labels


def moco_v2_colour(images):
    """MoCo v2's strong colour augmentation on uint8 HWC crops.

    ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, then RandomGrayscale(p=0.2). As in torchvision, contrast
    pivots on the image's mean gray level (b c x + b (1 - c) mean(gray(x)) = contrast after brightness), and
    grayscale is luma: saturation 0 of the gray-axis projection. The order is fixed (brightness, contrast,
    saturation, hue) where torchvision draws a random order per image.
    """
    jitter = fn.random.coin_flip(probability=0.8)
    keep_colour = 1 - fn.random.coin_flip(probability=0.2)

    def factor(strength):  # U(1 - s, 1 + s) when jittered, else 1
        return 1 + jitter * fn.random.uniform(range=[-strength, strength])

    images = brightness_contrast(images, factor(0.4), factor(0.4))
    hue = jitter * fn.random.uniform(range=[-36.0, 36.0])  # degrees: 0.1 of the colour circle
    return fn.hsv(images, saturation=factor(0.4) * keep_colour, hue=hue)


def brightness_contrast(images, brightness, contrast):
    """torchvision's adjust_brightness then adjust_contrast: b c x + b (1 - c) mean(gray(x))."""
    gray_mean = fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY))
    return fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=gray_mean)


def gaussian_blur(images):
    """MoCo v2's GaussianBlur(sigma in [0.1, 2]) with p=0.5; sigma 0.1 is a no-op for the other half
    (its kernel's off-centre weights are ~1e-22) and keeps the batch on one code path."""
    blur = fn.random.coin_flip(probability=0.5)
    sigma = 0.1 + blur * fn.random.uniform(range=[0.0, 1.9])
    return fn.gaussian_blur(images, sigma=sigma, window_size=13)  # 3 sigma each side of the widest kernel


@pipeline_def
def train_view(index: DatasetIndex, shard: Shard, cfg: DataConfig, gpu: bool, shuffle_seed: int, half: bool):
    """One augmented view: (images (B, H, W, 3) normalized, FLOAT16 if `half` else FLOAT; labels (B, 1)).
    FLOAT16 halves the GPU's traffic; on the CPU it is slower than FLOAT."""
    jpegs, labels = read_files(index, shard, shuffle=True, seed=shuffle_seed)
    gpu_hints = dict(hw_decoder_load=cfg.hw_decoder_load, **MIXED_DECODER_MEMORY) if gpu else {}
    images = fn.decoders.image_random_crop(
        jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
        random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio), num_attempts=10, **gpu_hints,
    )
    images = fn.resize(images, resize_x=cfg.crop_size, resize_y=cfg.crop_size, antialias=cfg.antialias)
    if cfg.augment == "strong":
        images = gaussian_blur(moco_v2_colour(images))
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if half else types.FLOAT, output_layout="HWC",
        mean=MEAN, std=STD, mirror=fn.random.coin_flip(probability=0.5),
    )
    return images, labels.gpu() if gpu else labels


@pipeline_def
def eval_view(index: DatasetIndex, shard: Shard, crop_size: int, gpu: bool):
    """Resize the shorter side to crop_size * 256/224, center crop, no flip; every image once, in order."""
    jpegs, labels = read_files(index, shard, shuffle=False, seed=0)
    gpu_hints = MIXED_DECODER_MEMORY if gpu else {}
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **gpu_hints)
    images = fn.resize(images, resize_shorter=round(crop_size * 256 / 224))
    images = fn.crop_mirror_normalize(
        images, crop=(crop_size, crop_size), dtype=types.FLOAT16 if gpu else types.FLOAT,
        output_layout="HWC", mean=MEAN, std=STD,
    )
    return images, labels.gpu() if gpu else labels


def nchw_view(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) as a view: the result is channels_last and shares the buffer."""
    return images.permute(0, 3, 1, 2)


def full_batches(total: int, shard: Shard, batch_size: int) -> int:
    """Full batches every rank can take: DALI's shards hold floor(N/W) or floor(N/W) + 1 samples."""
    return total // shard.num_shards // batch_size


class DaliBatches:
    """Iterates a built pipeline as (images NCHW view, labels (B,) int64) batches on the pipeline's device,
    one pass over the data per iteration; the last batch may be short (PARTIAL, padding removed).

    The iterator reuses its output buffers: clone a batch that must outlive the next iteration.
    """

    def __init__(self, pipe, classes: list[str]):
        pipe.build()
        self.iterator = DALIGenericIterator(
            pipe, ["images", "labels"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL,
        )
        self.classes = classes
        self.in_pass = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.in_pass:  # DALI cannot rewind, and a new pass would start where the old one stopped
            raise RuntimeError("the previous pass over this DALI loader was left unfinished; build a new one")
        self.in_pass = True
        for (batch,) in self.iterator:
            yield nchw_view(batch["images"]), batch["labels"].squeeze(-1).long()
        self.iterator.reset()
        self.in_pass = False


def decoder_device(device: torch.device) -> tuple[bool, Optional[int]]:
    """(gpu, device_id): the mixed decoder on a CUDA device; CPU mode needs device_id=None (not -1)."""
    if device.type == "cuda":
        return True, device.index if device.index is not None else torch.cuda.current_device()
    return False, None


class DaliLoader:
    """Training loader (the `Loader` protocol of fastreg.pipelines). Every rank takes the same number of full
    batches per epoch, floor(floor(N / W) / B); the few samples left in a pass are read and dropped.

    `state_dict()` holds DALI's pipeline checkpoint (reader position, shuffle and augmentation RNG): a
    loader rebuilt from it continues with the same samples, within an epoch or at its end.
    """

    def __init__(self, cfg: DataConfig, index: DatasetIndex, *, shard: Shard, seed: int, device: torch.device,
                 memory_format: torch.memory_format, half: bool = True, checkpoint: Optional[dict] = None):
        self.gpu, device_id = decoder_device(device)
        self.name = "dali-mixed" if self.gpu else "dali-cpu"
        self.memory_format = memory_format
        self.batches = full_batches(len(index.samples), shard, cfg.batch_size)
        if self.batches == 0:
            raise ValueError(
                f"{index.root} has {len(index.samples)} usable images: fewer than one batch of {cfg.batch_size} "
                f"per process across {shard.num_shards} process(es); lower data.batch_size"
            )
        self.identity = {"loader": self.name, "dataset": samples_digest(index.samples), "num_shards": shard.num_shards,
                         "batch_size": cfg.batch_size}
        checkpoint = usable_state(checkpoint, self.identity, order_has_state=True)
        # (epoch, batches of it done): DALI's reader advances its shuffle once per pass and cannot skip.
        self.position = (checkpoint["epoch"], checkpoint["batch"]) if checkpoint else (0, 0)
        pipe = train_view(
            index, shard, cfg, self.gpu, shuffle_seed=seed, half=half and self.gpu,
            batch_size=cfg.batch_size, num_threads=max(1, cfg.workers), device_id=device_id,
            seed=seed * 1_000 + shard.shard_id,  # augmentation differs across ranks; the shuffle does not
            prefetch_queue_depth=cfg.prefetch, enable_checkpointing=True,
            checkpoint=checkpoint["pipeline"] if checkpoint else None,
        )
        self.batches_iter = DaliBatches(pipe, index.classes)

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` not yet consumed: all of them, or the rest after a mid-epoch restore."""
        if epoch != self.position[0]:
            if self.position[1]:
                raise RuntimeError(f"the DALI loader stands in epoch {self.position[0]}, asked for epoch {epoch}")
            log.warning("DALI loader: epoch %d gets the shuffle order of pass %d (a resume without the loader's "
                        "state: its reader cannot skip ahead)", epoch, self.position[0])
        batches = iter(self.batches_iter)
        for done in range(self.position[1] + 1, self.batches + 1):
            images, labels = next(batches)
            self.position = (epoch, done)
            if done == self.batches:
                # Read and drop the pass's leftovers now, so that a state saved from here on starts the next
                # epoch. The drain reuses the iterator's buffers: keep a copy of this last batch.
                images, labels = images.clone(), labels.clone()
                for _ in batches:
                    pass
                self.position = (epoch + 1, 0)
            if self.memory_format != torch.channels_last:
                images = images.contiguous(memory_format=self.memory_format)
            yield images, labels

    def state_dict(self) -> dict:
        epoch, batch = self.position
        return {**self.identity, "pipeline": self.batches_iter.iterator.checkpoints()[0], "epoch": epoch,
                "batch": batch}


def dali_eval_loader(root: str, crop_size: int, batch_size: int, workers: int, device: torch.device,
                     **index_options) -> DaliBatches:
    """Every validated image once, in file-list order, the last batch short (k-NN, linear probe).
    index_options go to fastreg.index.load_index (max_bad_fraction, progress)."""
    index = load_index(root, **index_options)
    gpu, device_id = decoder_device(device)
    pipe = eval_view(index, Shard(), crop_size, gpu, batch_size=batch_size, num_threads=max(1, workers),
                     device_id=device_id, seed=0)
    return DaliBatches(pipe, index.classes)
