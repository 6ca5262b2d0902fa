"""NVIDIA DALI pipelines: JPEG decode on the GPU (nvJPEG + the hardware decoder) or on the CPU.

Training yields one augmented view per image, which feeds the student and, by default, every teacher. It is
SimReg's weak view (crop + flip), or with data.augment=strong|simclr SEED's MoCo-v2 or SimCLR colour
augmentation on top (ColorJitter in a random order per image, grayscale, blur). data.teacher_view=weak adds
the teachers' own view without the colours: the same crop box and flip, or with data.teacher_crop=independent a
crop and flip of its own. data.small_patches=P adds SEED's P small patches per image, each cut, coloured and
flipped on its own. On a GPU, `decoders.image_random_crop(device="mixed")` decodes only the crop's region (the
whole image when patches or independent crops are on); `crop_mirror_normalize(output_layout="HWC")`
writes an NHWC buffer, and the NCHW view of it that the trainer receives is already channels_last, without a copy.

The file list comes from `fastreg.index`, which decode-checks every image first: one corrupt JPEG
would otherwise kill the whole pipeline ("Critical error in pipeline", DALI cannot skip samples). The
decoders read JPEG (CMYK too), PNG, BMP and PNM by content, whatever the file is named. They ignore EXIF
orientation (adjust_orientation=False), as PIL's Image.open in SimReg's and SEED's loaders and in
pipelines/pil_folder.py does: a camera-rotated JPEG is seen as stored, by both loaders alike.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fastreg.config import DataConfig
from fastreg.index import DatasetIndex, load_index, positions_list
from fastreg.pipelines import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    checked_batches,
    dataset_identity,
    files_named,
    usable_state,
)
from fastreg.seeding import mix_seed

log = logging.getLogger(__name__)
READER = "reader"  # the iterator finds epoch size and shard geometry through the reader's name
MEAN = [255 * m for m in IMAGENET_MEAN]  # crop_mirror_normalize works on 0..255 pixels
STD = [255 * s for s in IMAGENET_STD]
# The mixed decoder's memory, sized once for ImageNet's largest JPEG (DALI's ResNet-50 example): its
# pools only grow, and growing them mid-epoch stalls the pipeline.
MIXED_DECODER_MEMORY = dict(
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


@dataclass(frozen=True)
class Shard:
    """Which part of the dataset this process reads: shard_id = global rank, num_shards = world size."""

    shard_id: int = 0
    num_shards: int = 1


def read_files(index: DatasetIndex, shard: Shard, *, shuffle: bool, seed: int, positions: bool = False):
    """JPEG bytes and labels of the validated files, or with `positions` their positions in index.samples.
    Training reshuffles the entire dataset every epoch with a seed shared by all ranks, so the shards partition
    one permutation (each sample at most once per epoch); pad_last_batch gives every shard's pass the same length
    (DaliLoader never trains on the pad)."""
    shuffling = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed) if shuffle else {}
    jpegs, labels = fn.readers.file(
        file_root=str(index.root),
        file_list=str(positions_list(index) if positions else index.file_list),
        shard_id=shard.shard_id,
        num_shards=shard.num_shards,
        pad_last_batch=True,
        name=READER,
        **shuffling,
    )
    return jpegs, labels


# ColorJitter's ops by number; PERMUTATIONS[i] is one order: the op at each of the 4 slots.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
PERMUTATIONS = list(itertools.permutations(range(4)))  # 24 orders, as torch.randperm(4) draws them


def random_order():
    """One index into PERMUTATIONS per sample, uniform: ColorJitter's random order of its four ops."""
    return fn.random.uniform(values=list(range(len(PERMUTATIONS))), dtype=types.INT32)


def colour_jitter(images, brightness, contrast, saturation, hue, order):
    """torchvision's ColorJitter on uint8 HWC images, each image with its own factors and op order.

    brightness, contrast, saturation: factors (1 = unchanged); hue: degrees (0 = unchanged); order: an index
    into PERMUTATIONS; each a per-sample DataNode or a constant. DALI has no per-sample control flow, so the
    four ops run in four slots: at slot k every op is applied, but only the one PERMUTATIONS[order][k] names
    gets its factor, the others get identity factors, which leave uint8 pixels exactly as they are. The images
    stay uint8 between slots, so each op clamps to [0, 255] and rounds as torchvision's ops on PIL images do:
    that clamping is why the order matters (brightness 1.8 then contrast 0.3 is not the reverse).

    Brightness scales, contrast pivots on the current image's mean gray level, saturation blends with the
    luma gray (0.299 R + 0.587 G + 0.114 B, as torchvision). Hue differs: DALI's fn.hsv rotates the chroma
    plane of YIQ by `hue` degrees, where torchvision shifts H in HSV; both turn the colour circle, their
    colours differ.
    """
    for slot in range(4):
        op = fn.lookup_table(
            order,
            keys=list(range(len(PERMUTATIONS))),
            values=[permutation[slot] for permutation in PERMUTATIONS],
            dtype=types.INT32,
        )

        def here(which, op=op):  # 1.0 where this slot runs op `which`, else 0.0
            return fn.cast(op == which, dtype=types.FLOAT)

        images = brightness_contrast(
            images, 1 + here(BRIGHTNESS) * (brightness - 1), 1 + here(CONTRAST) * (contrast - 1)
        )
        images = fn.hsv(images, saturation=1 + here(SATURATION) * (saturation - 1), hue=here(HUE) * hue)
    return images


def random_jitter(images, strength: float, hue_strength: float, applied=1):
    """ColorJitter(strength, strength, strength, hue_strength) in a random order per image: factors
    U(1 - s, 1 + s), hue U(-h, h) of the colour circle. `applied` (per-sample 0/1, or 1 for every image) gives
    RandomApply: where it is 0, every factor is the identity."""

    def factor(s):
        return 1 + applied * fn.random.uniform(range=[-s, s])

    hue = applied * fn.random.uniform(range=[-360 * hue_strength, 360 * hue_strength])  # degrees
    return colour_jitter(images, factor(strength), factor(strength), factor(strength), hue, random_order())


def random_grayscale(images, probability: float = 0.2):
    """RandomGrayscale(p): luma in all three channels (fn.hsv's saturation 0 keeps YIQ's Y, torchvision's
    luma); saturation 1 leaves the image as it is."""
    gray = fn.cast(fn.random.coin_flip(probability=probability), dtype=types.FLOAT)  # fn.hsv takes float factors
    return fn.hsv(images, saturation=1 - gray)


def strong_view(images):
    """SEED's mocov2_aug after the crop: ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(p=0.2),
    GaussianBlur(sigma 0.1-2) with p=0.5."""
    jittered = random_jitter(images, 0.4, 0.1, applied=fn.random.coin_flip(probability=0.8))
    return gaussian_blur(random_grayscale(jittered))


def simclr_view(images):
    """SEED's simclr_aug (its mocov1_aug) after the crop: RandomGrayscale(p=0.2), then ColorJitter(0.4, 0.4,
    0.4, 0.4) on every image; no blur."""
    return random_jitter(random_grayscale(images), 0.4, 0.4)


def brightness_contrast(images, brightness, contrast):
    """torchvision's adjust_brightness then adjust_contrast: b c x + b (1 - c) mean(gray(x))."""
    gray_mean = fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY))
    # Named arguments must be CPU nodes: on the mixed path the mean is a GPU scalar per image, copied to the host
    # here (DALI 2's default dynamic executor allows it; a no-op on the CPU path).
    return fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=gray_mean.cpu())


def gaussian_blur(images):
    """MoCo v2's GaussianBlur(sigma in [0.1, 2]) with p=0.5; sigma 0.1 is a no-op for the other half
    (its kernel's off-centre weights are ~1e-22) and keeps the batch on one code path."""
    blur = fn.random.coin_flip(probability=0.5)
    sigma = 0.1 + blur * fn.random.uniform(range=[0.0, 1.9])
    return fn.gaussian_blur(images, sigma=sigma, window_size=13)  # 3 sigma each side of the widest kernel


def colour_view(images, augment: str):
    """data.augment's colour ops on uint8 HWC crops: none for weak."""
    if augment == "strong":
        return strong_view(images)
    if augment == "simclr":
        return simclr_view(images)
    return images


def normalize(images, mirror, dtype):
    """ImageNet-normalized, mirrored where `mirror` (per sample 0/1) is 1, written as an NHWC buffer."""
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC", mean=MEAN, std=STD, mirror=mirror)


def training_decoder(cfg: DataConfig, gpu: bool) -> dict:
    """The training decoders' arguments: RGB as stored, on the mixed decoder with its hardware share and pools."""
    common = dict(output_type=types.RGB, adjust_orientation=False)
    if not gpu:
        return dict(device="cpu", **common)
    return dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load, **MIXED_DECODER_MEMORY, **common)


def decode_crop(jpegs, cfg: DataConfig, gpu: bool):
    """The global view's random-resized crop (crop_size, crop_size, 3) uint8, decoding only the crop's region."""
    images = fn.decoders.image_random_crop(
        jpegs,
        random_area=list(cfg.scale),
        random_aspect_ratio=list(cfg.ratio),
        num_attempts=10,
        **training_decoder(cfg, gpu),
    )
    return fn.resize(images, resize_x=cfg.crop_size, resize_y=cfg.crop_size, antialias=cfg.antialias)


def random_resized_crop(images, size: int, scale: list[float], ratio: list[float], antialias: bool):
    """RandomResizedCrop(size, scale, ratio) of decoded images, its own box per sample: (size, size, 3) uint8."""
    return fn.random_resized_crop(
        images,
        size=[size, size],
        random_area=list(scale),
        random_aspect_ratio=list(ratio),
        num_attempts=10,
        antialias=antialias,
    )


def small_patches(whole, cfg: DataConfig, dtype):
    """SEED's swav_small_aug: data.small_patches crops of each whole image, stacked to (P, p, p, 3) normalized.
    Each patch draws its own box, data.augment colours and flip: every op here is a new operator instance, with
    its own seed, since DALI cannot fan one sample out into several."""
    patches = []
    for _ in range(cfg.small_patches):
        patch = random_resized_crop(whole, cfg.small_patch_size, cfg.small_patch_scale, cfg.ratio, cfg.antialias)
        patch = colour_view(patch, cfg.augment)
        patches.append(normalize(patch, fn.random.coin_flip(probability=0.5), dtype))
    return fn.stack(*patches, axis_name="F")


def train_outputs(cfg: DataConfig) -> list[str]:
    """train_view's outputs by name, in order: the iterator's output map and Batch's fields."""
    teacher = ["teacher_images"] if cfg.teacher_view == "weak" else []
    return ["images", "positions", *teacher, *(["patches"] if cfg.small_patches else [])]


def independent_teacher_crop(cfg: DataConfig) -> bool:
    return cfg.teacher_view == "weak" and cfg.teacher_crop == "independent"


def teacher_weak_view(cfg: DataConfig, whole, crops, mirror, dtype):
    """The teachers' weak view, normalized: data.teacher_crop=shared the student's `crops` and `mirror` without
    the colours; independent a random-resized crop of the `whole` image and a flip of their own (SimReg's
    TwoCropsTransform). Each DALI random op draws from its own seed, which the pipeline's seed gives it, so the
    teachers' box and flip are drawn apart from the student's, and replay with the pipeline's seed and state."""
    if independent_teacher_crop(cfg):
        crops = random_resized_crop(whole, cfg.crop_size, cfg.scale, cfg.ratio, cfg.antialias)
        mirror = fn.random.coin_flip(probability=0.5)
    return normalize(crops, mirror, dtype)


@pipeline_def
def train_view(index: DatasetIndex, shard: Shard, cfg: DataConfig, gpu: bool, shuffle_seed: int, half: bool):
    """The training views, in the order of train_outputs(cfg), normalized and FLOAT16 if `half` else FLOAT
    (FLOAT16 halves the GPU's traffic; on the CPU it is slower than FLOAT):
    images (B, H, W, 3), the student's view: a random-resized crop, flipped, with data.augment's colours;
    positions (B, 1) in index.samples;
    teacher_images (B, H, W, 3), data.teacher_view=weak: teacher_weak_view's crop and flip, without the colours;
    patches (B, P, p, p, 3), data.small_patches=P.

    Without patches or an independent teachers' crop, the decoder decodes only the crop's region. With them, the
    image is decoded whole once and every crop cut from it: a patch or the teachers' crop may lie anywhere in it."""
    jpegs, positions = read_files(index, shard, shuffle=True, seed=shuffle_seed, positions=True)
    dtype = types.FLOAT16 if half else types.FLOAT
    whole = None
    if cfg.small_patches or independent_teacher_crop(cfg):
        whole = fn.decoders.image(jpegs, **training_decoder(cfg, gpu))
        crops = random_resized_crop(whole, cfg.crop_size, cfg.scale, cfg.ratio, cfg.antialias)
    else:
        crops = decode_crop(jpegs, cfg, gpu)
    images = colour_view(crops, cfg.augment)
    mirror = fn.random.coin_flip(probability=0.5)
    views = {"images": normalize(images, mirror, dtype), "positions": positions.gpu() if gpu else positions}
    if cfg.teacher_view == "weak":
        views["teacher_images"] = teacher_weak_view(cfg, whole, crops, mirror, dtype)
    if cfg.small_patches:
        views["patches"] = small_patches(whole, cfg, dtype)
    return tuple(views[name] for name in train_outputs(cfg))


def resize_like_torchvision(images, shorter: int):
    """torchvision's Resize(shorter): the shorter side becomes `shorter`, the longer one
    floor(shorter * long / short). fn.resize(resize_shorter=) rounds the longer side instead, and one pixel
    more moves the center crop by half a pixel."""
    shape = images.shape()  # (H, W, C) int64, on the CPU also for GPU images
    height, width = shape[0], shape[1]
    portrait = fn.cast(width <= height, dtype=types.INT64)  # torchvision's `w <= h`: the width is the short side
    new_width = portrait * shorter + (1 - portrait) * (shorter * width // height)
    new_height = portrait * (shorter * height // width) + (1 - portrait) * shorter
    return fn.resize(
        images, resize_x=fn.cast(new_width, dtype=types.FLOAT), resize_y=fn.cast(new_height, dtype=types.FLOAT)
    )


def center_crop_like_torchvision(images, size: int):
    """torchvision's CenterCrop(size) of an image at least `size` on each side: the offset is
    round((side - size) / 2) with Python's round-half-to-even, where DALI's crop rounds halves up."""

    def offset(extra):  # round(extra / 2), halves to even: q + 1 only when extra is odd and q = extra // 2 odd
        half = extra // 2
        return half + (extra % 2) * (half % 2)

    shape = images.shape()
    start = fn.stack(offset(shape[0] - size), offset(shape[1] - size))  # (top, left)
    return fn.slice(images, start=fn.cast(start, dtype=types.INT32), shape=[size, size], axis_names="HW")


@pipeline_def
def eval_view(index: DatasetIndex, shard: Shard, crop_size: int, gpu: bool):
    """Resize the shorter side to crop_size * 256/224, center crop, no flip; every image once, in order.

    The pixels are torchvision's eval_transform's (PIL decode, Resize, CenterCrop), within resampling
    differences: the decoders both use libjpeg's "fancy" chroma upsampling (the mixed decoder's nvJPEG only
    with jpeg_fancy_upsampling=True, the CPU decoder always), and the resized size and crop offset are
    torchvision's."""
    jpegs, labels = read_files(index, shard, shuffle=False, seed=0)
    gpu_hints = MIXED_DECODER_MEMORY if gpu else {}
    images = fn.decoders.image(
        jpegs,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        jpeg_fancy_upsampling=True,
        adjust_orientation=False,
        **gpu_hints,
    )
    images = resize_like_torchvision(images, round(crop_size * 256 / 224))
    images = center_crop_like_torchvision(images, crop_size)
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if gpu else types.FLOAT,
        output_layout="HWC",
        mean=MEAN,
        std=STD,
    )
    return images, labels.gpu() if gpu else labels


def nchw_view(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) as a view: the result is channels_last and shares the buffer."""
    return images.permute(0, 3, 1, 2)


def torch_view(output: torch.Tensor) -> torch.Tensor:
    """An iterator output as the trainer takes it. Images (B, H, W, C) and patches (B, P, H, W, C) become
    NCHW views, (B, C, H, W) and (B * P, C, H, W) image-major, without a copy; labels or positions (B, 1)
    become (B,) int64."""
    if output.dim() == 2:
        return output.squeeze(-1).long()
    return nchw_view(output.flatten(0, -4))  # flatten(0, 0) returns the tensor itself


def full_batches(total: int, shard: Shard, batch_size: int) -> int:
    """Full batches every rank can take: DALI's shards hold floor(N/W) or floor(N/W) + 1 samples."""
    return total // shard.num_shards // batch_size


class DaliBatches:
    """Iterates a built pipeline over `index`'s files as tuples of its outputs, named by `names` in the pipeline's
    order, on the pipeline's device (torch_view: images as NCHW views, labels (B,) int64), one pass over the data
    per iteration; the last batch may be short (PARTIAL, padding removed). Eval's are (images, labels).

    The iterator reuses its output buffers: clone a batch that must outlive the next iteration.
    """

    def __init__(self, pipe, index: DatasetIndex, names: list[str] | None = None):
        self.index, self.classes = index, index.classes
        self.names = names or ["images", "labels"]
        with files_named(index, stopped_by_a_file):  # the iterator runs the pipeline for its first batches already
            pipe.build()
            self.iterator = DALIGenericIterator(
                pipe,
                self.names,
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.PARTIAL,
            )
        self.in_pass = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.in_pass:  # DALI cannot rewind, and a new pass would start where the old one stopped
            raise RuntimeError("the previous pass over this DALI loader was left unfinished; build a new one")
        self.in_pass = True
        for outputs in checked_batches(iter(self.iterator), self.index, stopped_by_a_file):  # [{name: tensor}]
            yield tuple(torch_view(outputs[0][name]) for name in self.names)  # one dict per pipeline: outputs[0]
        self.iterator.reset()
        self.in_pass = False


def stopped_by_a_file(error: Exception) -> str | None:
    """The DALI pipeline and its reason, for files_named, when a decoder or the file reader stopped it (DALI says
    "Critical error in pipeline ... nvImageCodec failure: '#3'", naming no file); None for any other error."""
    if isinstance(error, RuntimeError) and any(op in str(error) for op in ("fn.decoders.", "fn.readers.file")):
        return f"the DALI pipeline ({dali_reason(error)})"
    return None


def dali_reason(error: RuntimeError) -> str:
    """What DALI's error says went wrong ("nvImageCodec failure: '#3'"), without the pipeline's traceback."""
    lines = [line.strip() for line in str(error).split("encountered:", 1)[-1].splitlines() if line.strip()]
    return lines[0] if lines else "a critical error"


def decoder_device(device: torch.device) -> tuple[bool, int | None]:
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

    def __init__(
        self,
        cfg: DataConfig,
        index: DatasetIndex,
        *,
        shard: Shard,
        seed: int,
        device: torch.device,
        memory_format: torch.memory_format,
        half: bool = True,
        checkpoint: dict | None = None,
    ):
        self.gpu, device_id = decoder_device(device)
        self.name = "dali-mixed" if self.gpu else "dali-cpu"
        self.memory_format = memory_format
        self.batches = full_batches(len(index.samples), shard, cfg.batch_size)
        self.identity = dataset_identity(self.name, index, shard.num_shards, cfg.batch_size, self.batches)
        # DALI restores a state only into the same operators; None for one view (as states saved before it)
        views = f"{cfg.augment}, teacher_view={cfg.teacher_view}, small_patches={cfg.small_patches}"
        views += ", teacher_crop=independent" if independent_teacher_crop(cfg) else ""  # shared: as states before it
        self.identity["views"] = views if cfg.teacher_view != "same" or cfg.small_patches else None
        checkpoint = usable_state(checkpoint, self.identity, order_has_state=True)
        # (epoch, batches of it done): DALI's reader advances its shuffle once per pass and cannot skip.
        self.position = (checkpoint["epoch"], checkpoint["batch"]) if checkpoint else (0, 0)
        pipe = train_view(
            index,
            shard,
            cfg,
            self.gpu,
            shuffle_seed=seed,
            half=half and self.gpu,
            batch_size=cfg.batch_size,
            num_threads=max(1, cfg.workers),
            device_id=device_id,
            # the augmentation differs across ranks; the shuffle does not
            seed=mix_seed("augment", seed, shard.shard_id),
            prefetch_queue_depth=cfg.prefetch,
            enable_checkpointing=True,
            checkpoint=checkpoint["pipeline"] if checkpoint else None,
        )
        self.index = index
        self.batches_iter = DaliBatches(pipe, index, train_outputs(cfg))
        self.labels = torch.tensor([label for _, label in index.samples], device=device)  # by position

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch` not yet consumed: all of them, or the rest after a mid-epoch restore."""
        if epoch != self.position[0]:
            if self.position[1]:
                raise RuntimeError(f"the DALI loader stands in epoch {self.position[0]}, asked for epoch {epoch}")
            log.warning(
                "DALI loader: epoch %d gets the shuffle order of pass %d (a resume without the loader's "
                "state: its reader cannot skip ahead)",
                epoch,
                self.position[0],
            )
        batches = iter(self.batches_iter)
        for done in range(self.position[1] + 1, self.batches + 1):
            outputs = next(batches)
            self.position = (epoch, done)
            if done == self.batches:
                # Read and drop the pass's leftovers now, so that a state saved from here on starts the next
                # epoch. The drain reuses the iterator's buffers: keep a copy of this last batch, every output.
                outputs = tuple(output.clone() for output in outputs)
                for _ in batches:
                    pass
                self.position = (epoch + 1, 0)
            views = dict(zip(self.batches_iter.names, outputs))
            positions = views.pop("positions")
            if self.memory_format != torch.channels_last:
                views = {name: v.contiguous(memory_format=self.memory_format) for name, v in views.items()}
            yield Batch(labels=self.labels[positions], indices=positions, **views)

    def state_dict(self) -> dict:
        epoch, batch = self.position
        return {
            **self.identity,
            "pipeline": self.batches_iter.iterator.checkpoints()[0],
            "epoch": epoch,
            "batch": batch,
        }


def dali_eval_loader(
    root: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
    **index_options,
) -> DaliBatches:
    """Every validated image once (or shard = (rank, world size)'s contiguous part, fastreg.pipelines.shard_range),
    in file-list order, the last batch short (k-NN, linear probe, the teacher cache). index_options go to
    fastreg.index.load_index."""
    index = load_index(root, **index_options)
    gpu, device_id = decoder_device(device)
    pipe = eval_view(
        index,
        Shard(*shard),
        crop_size,
        gpu,
        batch_size=batch_size,
        num_threads=max(1, workers),
        device_id=device_id,
        seed=0,
    )
    return DaliBatches(pipe, index)
