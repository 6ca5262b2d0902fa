"""DALI pipelines in CPU mode (device_id=None), against the torchvision reference loader."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ODD_BUT_READABLE,
    add_odd_files,
    make_image_folder,
    make_photo_folder,
    overwrite_in_place,
    stopped_by_a_file,
)
from PIL import Image
from torchvision.datasets import ImageFolder

from fastreg.config import DataConfig
from fastreg.index import load_index
from fastreg.pipelines import IMAGENET_MEAN, IMAGENET_STD, build_loader, eval_batches, resolve_loader
from fastreg.pipelines.dali import DaliLoader, Shard, colour_jitter, dali_eval_loader, random_order
from fastreg.pipelines.pil_folder import eval_loader

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def data_config(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"loader": "dali", "root": str(root), "crop_size": 24, "batch_size": 4, "workers": 1, **kw})


def dali_loader(root: Path, shard: Shard | None = None, checkpoint=None, device=CPU, **kw) -> DaliLoader:
    cfg = data_config(root, **kw)
    return DaliLoader(
        cfg,
        load_index(root, progress=False),
        shard=shard or Shard(),
        seed=0,
        device=device,
        memory_format=torch.channels_last,
        checkpoint=checkpoint,
    )


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalized (B, 3, H, W) back to 0..255."""
    return (images * STD + MEAN) * 255


def one_image_per_class(root: Path, n: int, size: int = 40) -> Path:
    """n classes of one JPEG each: a label names its file."""
    return make_image_folder(root, classes=n, per_class=1, size=size)


def coordinate_images(root: Path, copies: int, size: int = 200) -> Path:
    """JPEGs whose red channel is x and green channel is y (0..255): a crop shows where it was cut from."""
    ramp = np.linspace(0, 255, size)
    img = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)], -1)
    (root / "c").mkdir(parents=True)
    for i in range(copies):
        Image.fromarray(img.round().astype(np.uint8)).save(root / "c" / f"{i}.jpg", quality=95)
    return root


def crop_geometry(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(area fraction, flipped) of each crop of a coordinate image, read from its edge pixels."""
    p = pixels(images.float()) / 255
    x_left, x_right = p[:, 0, :, 0].mean(1), p[:, 0, :, -1].mean(1)  # red along the left / right column
    y_top, y_bottom = p[:, 1, 0, :].mean(1), p[:, 1, -1, :].mean(1)
    side = images.shape[-1]
    pad = 1 / side  # edge pixels sit half a pixel inside the crop: widen by one output pixel's share
    width = (x_right - x_left).abs() * (1 + pad)
    height = (y_bottom - y_top) * (1 + pad)
    return width * height, x_left > x_right


# ------------------------------------------------------------------------------------ batch layout


def test_batch_is_an_nchw_view_of_the_nhwc_buffer(tmp_path):
    ld = dali_loader(make_image_folder(tmp_path, per_class=8))
    assert ld.name == "dali-cpu" and len(ld) == 4
    batch = next(iter(ld.epoch(0)))
    images, labels = batch.images, batch.labels
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32  # FLOAT on CPU
    assert images.is_contiguous(memory_format=torch.channels_last)
    nhwc = images._base  # the iterator's own output tensor: the view made no copy
    assert nhwc is not None and nhwc.shape == (4, 24, 24, 3) and nhwc.is_contiguous()
    assert images.data_ptr() == nhwc.data_ptr() and images.stride() == (24 * 24 * 3, 1, 24 * 3, 3)
    assert labels.dtype == batch.indices.dtype == torch.long and labels.shape == batch.indices.shape == (4,)
    assert images.min() < 0 < images.max()  # ImageNet-normalized


def test_contiguous_format_when_channels_last_is_off(tmp_path):
    root = make_image_folder(tmp_path, per_class=4)
    cfg = data_config(root)
    ld = DaliLoader(
        cfg, load_index(root, progress=False), shard=Shard(), seed=0, device=CPU, memory_format=torch.contiguous_format
    )
    images = next(iter(ld.epoch(0))).images
    assert images.is_contiguous()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_teacher_view_and_patches_have_the_images_layout(tmp_path, memory_format):
    """teacher_images (B, 3, H, W) and patches (B * P, 3, p, p): NCHW views of their own NHWC buffers, or
    contiguous copies when channels_last is off, in the images' dtype."""
    root = make_image_folder(tmp_path, per_class=4)
    cfg = data_config(root, augment="strong", teacher_view="weak", small_patches=3, small_patch_size=12)
    ld = DaliLoader(
        cfg, load_index(root, progress=False), shard=Shard(), seed=0, device=CPU, memory_format=memory_format
    )
    batch = next(iter(ld.epoch(0)))
    assert batch.teacher_images.shape == batch.images.shape == (4, 3, 24, 24)
    assert batch.patches.shape == (12, 3, 12, 12)
    for x in (batch.images, batch.teacher_images, batch.patches):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=memory_format)
    if memory_format == torch.channels_last:
        assert batch.teacher_images._base.shape == (4, 24, 24, 3)
        assert batch.patches._base.shape == (4, 3, 12, 12, 3)  # (B, P, p, p, 3), the pipeline's stack
        assert batch.patches.data_ptr() == batch.patches._base.data_ptr()
        assert batch.teacher_images.data_ptr() not in (batch.images.data_ptr(), batch.patches.data_ptr())


# --------------------------------------------------------------------------------- shards, epochs


def test_two_shards_partition_every_epoch_and_reshuffle(tmp_path):
    root = one_image_per_class(tmp_path, 24)
    shards = [dali_loader(root, Shard(r, 2), batch_size=3) for r in range(2)]
    orders = []
    for epoch in range(3):
        seen = [torch.cat([b.labels for b in ld.epoch(epoch)]).tolist() for ld in shards]
        assert len(seen[0]) == len(seen[1]) == 12  # the same number of steps on both ranks
        assert sorted(seen[0] + seen[1]) == list(range(24))  # every sample once per epoch
        orders.append(seen[0] + seen[1])
    assert len({tuple(order) for order in orders}) == 3  # a new permutation every epoch


@pytest.mark.parametrize("images, ranks, batch", [(13, 2, 3), (15, 2, 4), (14, 3, 4), (16, 3, 2), (9, 1, 4)])
def test_uneven_shards_keep_ranks_in_step(tmp_path, images, ranks, batch):
    """Shards of floor(N/W) or floor(N/W) + 1 images: every rank takes floor(floor(N/W) / B) full batches of
    distinct images in every epoch, and no padding or leftover spills into the next epoch."""
    root = one_image_per_class(tmp_path, images)
    shards = [dali_loader(root, Shard(r, ranks), batch_size=batch) for r in range(ranks)]
    steps = images // ranks // batch
    assert [len(ld) for ld in shards] == [steps] * ranks
    for epoch in range(3):
        seen = [[b.labels.tolist() for b in ld.epoch(epoch)] for ld in shards]
        assert all(len(batches) == steps and all(len(b) == batch for b in batches) for batches in seen)
        flat = [label for batches in seen for b in batches for label in b]
        assert len(set(flat)) == len(flat) == steps * batch * ranks, epoch


def test_an_interrupted_pass_is_refused_not_resumed(tmp_path):
    batches = dali_eval_loader(str(one_image_per_class(tmp_path, 6)), 24, 2, 1, CPU)
    next(iter(batches))
    with pytest.raises(RuntimeError, match="left unfinished"):
        list(batches)


def test_eval_pipeline_sees_every_image_once_in_order(tmp_path):
    root = one_image_per_class(tmp_path, 11)
    batches = dali_eval_loader(str(root), crop_size=24, batch_size=4, workers=1, device=CPU)
    for _ in range(2):  # and again: the iterator resets after each pass
        sizes, labels = zip(*[(len(y), y) for _, y in batches])
        assert sizes == (4, 4, 3)  # PARTIAL: the last batch is short, nothing padded or dropped
        assert torch.cat(labels).tolist() == list(range(11))
    assert batches.classes == ImageFolder(str(root)).classes


# ------------------------------------------------------------------ a file that changes after the index checked it


def stopped_on(root: Path, rel: str, reason: str) -> str:
    """The message of a DALI loader stopped by `rel` (a pattern for pytest's match), with DALI's reason."""
    return stopped_by_a_file(root, rel, reason, reader=re.escape("the DALI pipeline (") + r"[^)]*\)")


def test_a_jpeg_corrupted_during_training_is_named_and_left_out_next_time(tmp_path, caplog):
    """DALI said "nvImageCodec failure: '#3'" and named no file, and every rerun stopped the same way."""
    root = make_image_folder(tmp_path / "data", per_class=16)  # 32 images, batch 4: 8 batches an epoch
    loader = dali_loader(root)
    overwrite_in_place(root / "class1" / "10.jpg")
    with pytest.raises(ValueError, match=stopped_on(root, "class1/10.jpg", "not an image")):
        for epoch in range(2):  # read after the change in one of them: the first batches are prefetched
            for _ in loader.epoch(epoch):
                pass
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        index = load_index(root, progress=False, max_bad_fraction=0.05)  # the next run's index, as updated
    assert index.bad == [("class1/10.jpg", "not an image")] and len(index.samples) == 31
    assert "left out 1 of 32 images that fail the decode check (one would stop a DALI pipeline)" in caplog.text
    rerun = DaliLoader(data_config(root), index, shard=Shard(), seed=0, device=CPU, memory_format=torch.channels_last)
    for epoch in range(2):
        assert len(list(rerun.epoch(epoch))) == 7


@pytest.mark.parametrize(
    "change, reason",
    [(overwrite_in_place, "not an image"), (Path.unlink, "missing")],
    ids=["corrupted_in_place", "removed"],
)
def test_the_eval_loader_names_a_file_that_changed_after_indexing(tmp_path, change, reason):
    root = make_image_folder(tmp_path / "data", per_class=16)
    batches = dali_eval_loader(str(root), crop_size=24, batch_size=4, workers=1, device=CPU)
    change(root / "class1" / "10.jpg")  # position 26: batch 7 of 8, after the prefetched ones
    with pytest.raises(ValueError, match=stopped_on(root, "class1/10.jpg", reason)):
        list(batches)
    again = dali_eval_loader(str(root), crop_size=24, batch_size=4, workers=1, device=CPU, max_bad_fraction=0.05)
    assert torch.cat([labels for _, labels in again]).tolist() == [0] * 16 + [1] * 15


def test_a_fresh_run_leaves_out_a_jpeg_corrupted_since_the_index_was_built(tmp_path, caplog):
    """Its size and mtime are kept, its ctime is not: the next run's index checks it again, and leaves it out."""
    root = make_image_folder(tmp_path / "data", per_class=16)
    dali_loader(root)
    overwrite_in_place(root / "class0" / "3.jpg")
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        index = load_index(root, progress=False, max_bad_fraction=0.05)
    assert "left out 1 of 32 images that fail the decode check" in caplog.text and "class0/3.jpg (not an image)" in (
        caplog.text
    )
    loader = DaliLoader(data_config(root), index, shard=Shard(), seed=0, device=CPU, memory_format=torch.channels_last)
    assert sum(len(batch.indices) for batch in loader.epoch(0)) == 28  # 7 full batches of the 31


def test_eval_center_crop_matches_torchvision(tmp_path):
    """Resize the shorter side to 256/224 of the crop, center crop, no flip: the pixels of the reference."""
    root = coordinate_images(tmp_path, copies=2, size=60)
    for img in (root / "c").iterdir():  # a non-square image shows a wrong resize or crop offset
        Image.open(img).resize((90, 60)).save(img, quality=95)
    ((dali_x, dali_y),) = list(dali_eval_loader(str(root), 32, 2, 1, CPU))
    ref_x, ref_y = next(iter(eval_loader(str(root), 32, 2, 0)))
    assert torch.equal(dali_y, ref_y)
    # One output pixel is 4.6 of 255 on this ramp. Measured: 0.18 with torchvision's resized size (55 wide here)
    # and crop offset; 3.3 with fn.resize(resize_shorter=), which rounds the long side to 56.
    assert (pixels(dali_x) - pixels(ref_x)).abs().mean() < 1.0


@pytest.fixture(scope="module")
def photo_jpegs(tmp_path_factory) -> Path:
    """24 JPEGs cut from real photographs, about 500 x 375, 4:2:0 chroma (benchmarks/make_jpegs.py)."""
    from benchmarks.make_jpegs import make_image_folder as make_photo_jpegs

    root = tmp_path_factory.mktemp("photos")
    make_photo_jpegs(root, images=24, classes=2, seed=0)
    return root


# Mean |difference| of one 224 eval crop, in grey levels, allowed between DALI and torchvision, and between
# DALI's mixed and CPU decoders. On photo_jpegs (CPU) the loaders differ by 0.14-0.16 per image; a half-pixel
# shift of the crop or resize gives 2.6 on average, and the mixed decoder without jpeg_fancy_upsampling 3.1.
EVAL_TOLERANCE = 1.0


def eval_crops(root: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """DALI's 224 eval crops of every image under root, as 0..255 pixels on the CPU, and their labels."""
    batches = [(pixels(x.float().cpu()), y.cpu()) for x, y in dali_eval_loader(str(root), 224, 8, 2, device)]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_eval_crops_of_photos_match_torchvision(photo_jpegs):
    """Every image's eval crop is within EVAL_TOLERANCE of torchvision's Resize(256) + CenterCrop(224) of PIL's
    decode: the same decode, resized size and crop offset, only the resampling differs."""
    dali_x, dali_y = eval_crops(photo_jpegs, CPU)
    ref = [(pixels(x), y) for x, y in eval_loader(str(photo_jpegs), 224, 8, 0)]
    ref_x, ref_y = torch.cat([x for x, _ in ref]), torch.cat([y for _, y in ref])
    assert torch.equal(dali_y, ref_y)
    per_image = (dali_x - ref_x).abs().mean((1, 2, 3))
    assert per_image.max() < EVAL_TOLERANCE, per_image


def test_cpu_decoder_upsamples_chroma_like_pil_with_or_without_the_flag(photo_jpegs):
    """DALI's CPU decoder is libjpeg-turbo with its fancy chroma upsampling, as PIL's: the same pixels, bit for
    bit, whatever jpeg_fancy_upsampling says (the flag only changes the mixed decoder)."""
    from nvidia.dali import fn, pipeline_def, types

    paths = sorted(photo_jpegs.rglob("*.jpg"))[:6]

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def decode():
        files, _ = fn.readers.file(files=[str(p) for p in paths])
        return tuple(
            fn.decoders.image(files, device="cpu", output_type=types.RGB, jpeg_fancy_upsampling=fancy)
            for fancy in (False, True)
        )

    pipe = decode()
    pipe.build()
    for batch in pipe.run():
        for i, path in enumerate(paths):
            assert np.array_equal(np.array(batch.at(i)), np.asarray(Image.open(path).convert("RGB"))), path.name


def test_exif_orientation_is_ignored_as_pil_does(tmp_path):
    """A JPEG whose EXIF says "rotate 90" is decoded as stored, as PIL's Image.open (the papers' loaders, and
    pipelines/pil_folder.py) reads it: DALI's default would turn it, and the two loaders would disagree."""
    photos = make_photo_folder(tmp_path / "photos", classes=1, per_class=1, size=(320, 240))
    stored = Image.open(photos / "class0" / "0.jpg").convert("RGB")  # 320 wide, 240 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise for display
    (tmp_path / "data" / "a").mkdir(parents=True)
    stored.save(tmp_path / "data" / "a" / "rotated.jpg", quality=95, exif=exif)
    data = tmp_path / "data"
    dali_eval, _ = eval_crops(data, CPU)
    ref_eval = torch.cat([pixels(x) for x, _ in eval_loader(str(data), 224, 8, 0)])
    assert (dali_eval - ref_eval).abs().mean() < EVAL_TOLERANCE
    # The whole stored image is the only crop of area 1 at aspect 4/3 (turned, it would be 3/4 and fall back)
    images = next(
        iter(dali_loader(data, batch_size=1, crop_size=48, scale=[1.0, 1.0], ratio=[4 / 3, 4 / 3]).epoch(0))
    ).images
    crop = pixels(images.float())[0]  # (3, 48, 48), maybe flipped
    ref = torch.from_numpy(np.array(stored.resize((48, 48), Image.BILINEAR))).permute(2, 0, 1).float()
    assert min((crop - ref).abs().mean(), (crop.flip(-1) - ref).abs().mean()) < 6


def test_cmyk_and_png_files_are_read_by_the_training_and_eval_loaders(tmp_path):
    """A CMYK JPEG and a PNG named .jpg are kept by the index; the DALI loaders decode them to 3 channels, and
    their eval crops are torchvision's."""
    root = make_image_folder(tmp_path, per_class=4, size=32)
    add_odd_files(root)
    index = load_index(root, progress=False)
    odd = {f"class1/{name}.jpg" for name in ODD_BUT_READABLE}
    assert odd <= {rel for rel, _ in index.samples} and len(index.samples) == 10
    ld = dali_loader(root, batch_size=5)
    labels = []
    for batch in ld.epoch(0):
        assert batch.images.shape == (5, 3, 24, 24) and torch.isfinite(batch.images).all()
        labels += batch.labels.tolist()
    assert sorted(labels) == [0] * 4 + [1] * 6  # every file once, the two odd ones among them
    ((dali_x, dali_y),) = list(dali_eval_loader(str(root), 24, 10, 1, CPU))
    ref_x, ref_y = next(iter(eval_loader(str(root), 24, 10, 0)))
    assert torch.equal(dali_y, ref_y) and dali_x.shape == (10, 3, 24, 24)
    per_image = (pixels(dali_x) - pixels(ref_x)).abs().mean((1, 2, 3))
    names = [Path(rel).name for rel, _ in index.samples]
    assert per_image.max() < EVAL_TOLERANCE, dict(zip(names, per_image.tolist()))  # measured: at most 0.57


# ---------------------------------------------------------------------------------------- resume


PATCHES = dict(small_patches=2, small_patch_size=12)
TEACHER_VIEW = dict(augment="strong", teacher_view="weak")


# Inside epoch 0, at its end, inside epoch 2; the colour augmentations' random ops are in the state too, and so
# are the teachers' view's and the small patches' (their own crops, colours and flips).
@pytest.mark.parametrize(
    "stop_after, options",
    [
        (1, {}),
        (3, {}),
        (4, {}),
        (9, {}),
        (3, dict(augment="strong")),
        (9, dict(augment="simclr")),
        (3, PATCHES),
        (4, dict(PATCHES, augment="strong")),
        (3, TEACHER_VIEW),
        (9, dict(TEACHER_VIEW, **PATCHES)),
        (3, dict(TEACHER_VIEW, teacher_crop="independent")),
        (9, dict(teacher_view="weak", teacher_crop="independent", **PATCHES)),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v),
)
def test_resume_from_state_continues_with_the_same_batches(tmp_path, stop_after, options):
    root = make_image_folder(tmp_path, per_class=9)  # 18 images, batch 4: 4 batches per epoch, 2 left over
    fields = {"images", "labels", "indices"}
    fields |= {"teacher_images"} if options.get("teacher_view") == "weak" else set()
    fields |= {"patches"} if options.get("small_patches") else set()

    def run(ld, epochs, stop=None):
        out = []
        for epoch in range(ld.position[0], epochs):
            for batch in ld.epoch(epoch):
                # the iterator reuses its buffers
                out.append({name: tensor.clone() for name, tensor in batch.tensors().items()})
                if len(out) == stop:
                    return out
        return out

    straight = run(dali_loader(root, **options), 3)
    first = dali_loader(root, **options)
    before = run(first, 3, stop=stop_after)
    after = run(dali_loader(root, checkpoint=first.state_dict(), **options), 3)
    assert len(before) + len(after) == len(straight) == 12
    for batch, reference in zip(before + after, straight):
        assert batch.keys() == reference.keys() == fields
        for name in fields:
            assert torch.equal(batch[name], reference[name]), name


def test_state_of_another_loader_or_dataset_restarts_the_order_with_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path, per_class=4)
    saved = dali_loader(root)
    list(saved.epoch(0))
    state = saved.state_dict()
    with caplog.at_level(logging.WARNING):
        assert dali_loader(root, checkpoint={"loader": "torchvision"}).position == (0, 0)
        assert dali_loader(root, checkpoint=state, batch_size=2).position == (0, 0)
        Image.open(root / "class0" / "0.jpg").save(root / "class0" / "new.jpg")
        assert dali_loader(root, checkpoint=state).position == (0, 0)
    warned = [r.getMessage() for r in caplog.records if "cannot continue from it" in r.getMessage()]
    assert len(warned) == 3
    assert "another loader" in warned[0] and "another batch_size" in warned[1] and "another dataset" in warned[2]


def test_state_of_a_pipeline_with_other_views_restarts_the_order_with_a_warning(tmp_path, caplog):
    """A state saved with small patches, a teacher view or its shared crop fits only a pipeline with the same
    operators; another one starts over with a warning (trainer.resume_force), where DALI would stop on it."""
    root = make_image_folder(tmp_path, per_class=4)
    patched = dali_loader(root, small_patches=2, small_patch_size=8)
    next(iter(patched.epoch(0)))
    with caplog.at_level(logging.WARNING):
        assert dali_loader(root, checkpoint=patched.state_dict()).position == (0, 0)
        patched_again = dali_loader(
            root, checkpoint=dali_loader(root).state_dict(), small_patches=2, small_patch_size=8
        )
        assert patched_again.position == (0, 0)
        shared = dali_loader(root, **TEACHER_VIEW)
        next(iter(shared.epoch(0)))
        independent = dali_loader(root, checkpoint=shared.state_dict(), teacher_crop="independent", **TEACHER_VIEW)
        assert independent.position == (0, 0)
    assert sum("another views" in r.getMessage() for r in caplog.records) == 3


# ------------------------------------------------------------------------- parity with torchvision


def reference_loader(root: Path, **kw):
    cfg = data_config(root, loader="torchvision", workers=0, **kw)
    return build_loader(cfg, rank=0, world_size=1, seed=0, device=CPU)


def draws(ld, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [(b.images.clone(), b.labels.clone()) for epoch in range(epochs) for b in ld.epoch(epoch)]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_labels_and_channel_statistics_match_torchvision(tmp_path):
    root = make_photo_folder(tmp_path, classes=3, per_class=8)
    dali_x, dali_y = draws(dali_loader(root, batch_size=8), epochs=40)
    ref_x, ref_y = draws(reference_loader(root, batch_size=8), epochs=40)
    assert torch.equal(torch.bincount(dali_y), torch.bincount(ref_y))  # each file once per epoch, same label
    # 960 random crops each: the statistics wander by up to ~0.03 between seeds; BGR order or a wrong
    # mean/std moves them by 0.3 or more.
    for stat in (lambda x: x.mean((0, 2, 3)), lambda x: x.std((0, 2, 3))):
        assert torch.allclose(stat(dali_x), stat(ref_x), atol=0.05), (stat(dali_x), stat(ref_x))


def test_same_file_same_label_as_torchvision(tmp_path):
    """A label names one file here, and its center crop is that file's pixels under both loaders."""
    root = one_image_per_class(tmp_path, 6, size=48)
    dali_x, dali_y = next(iter(dali_eval_loader(str(root), 24, 6, 1, CPU)))
    ref_x, ref_y = next(iter(eval_loader(str(root), 24, 6, 0)))
    assert torch.equal(dali_y, ref_y)
    per_image = (pixels(dali_x) - pixels(ref_x)).abs().mean((1, 2, 3))
    assert per_image.max() < 6  # same files; a shuffled pairing differs by ~40 (of 255)


def test_crop_area_and_flip_statistics_match_torchvision(tmp_path):
    """Over 480 draws: area fractions from data.scale [0.2, 1] and a coin-flip mirror, like RandomResizedCrop +
    RandomHorizontalFlip. Measured on this DALI pipeline: scale [0.08, 1] gives crops down to 0.08, scale
    [0.25, 1] none below 0.25, scale [0.5, 1] none below 0.45, ratio [1/2, 2] a mean area 0.06 lower;
    a missing flip gives no flipped crop."""
    root = coordinate_images(tmp_path, copies=16)
    stats = {}
    for name, ld in (
        ("dali", dali_loader(root, batch_size=16, crop_size=32)),
        ("torchvision", reference_loader(root, batch_size=16, crop_size=32)),
    ):
        area, flipped = crop_geometry(draws(ld, epochs=30)[0])
        stats[name] = area
        assert 0.4 < flipped.float().mean() < 0.6, name
        assert 0.18 < area.min() < 0.24 and area.max() < 1.05, name  # scale [0.25, 1]: none below 0.25
        assert (area < 0.45).float().mean() > 0.2, name  # U(0.2, 1) puts 31% below 0.45
    assert abs(stats["dali"].mean() - stats["torchvision"].mean()) < 0.04
    assert abs(stats["dali"].median() - stats["torchvision"].median()) < 0.06


# ------------------------------------------------------------------------ strong and simclr augmentation


def test_strong_augmentation_adds_colour_jitter_grayscale_and_blur(tmp_path):
    root = make_image_folder(tmp_path, classes=3, per_class=8, size=48)
    weak = pixels(draws(dali_loader(root, batch_size=8, crop_size=32), epochs=10)[0])
    strong = pixels(draws(dali_loader(root, batch_size=8, crop_size=32, augment="strong"), epochs=10)[0])

    def gray(x):  # R = G = B within JPEG rounding
        return ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 3) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 3)

    assert gray(weak).float().mean() == 0
    assert 0.1 < gray(strong).float().mean() < 0.3  # RandomGrayscale(p=0.2)
    brightness = lambda x: x.mean((1, 2, 3))  # noqa: E731
    assert brightness(strong).std() > 1.5 * brightness(weak).std()  # ColorJitter on 80% of the views

    def sharpness(x):  # mean squared difference of horizontal neighbours: blur lowers it
        return (x[..., 1:] - x[..., :-1]).pow(2).mean((1, 2, 3))

    assert (sharpness(strong) < 0.5 * sharpness(weak).median()).float().mean() > 0.2  # GaussianBlur(p=0.5)


def flat_colour_folder(root: Path, colour=(200, 120, 60), copies: int = 16) -> Path:
    """JPEGs of one flat colour: a crop or flip leaves the pixels as they are, colour ops do not."""
    (root / "c").mkdir(parents=True)
    for i in range(copies):
        Image.fromarray(np.full((36, 36, 3), colour, np.uint8)).save(root / "c" / f"{i}.jpg", quality=95)
    return root


def texture(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels over the image's variance, per view: blur lowers it, while
    colour jitter, nearly affine on an image, leaves it about as it is."""
    horizontal = (x[..., 1:] - x[..., :-1]).pow(2).mean((1, 2, 3))
    vertical = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean((1, 2, 3))
    return (horizontal + vertical) / x.var((1, 2, 3))


@pytest.mark.parametrize(
    "augment, jittered, blurred",
    [
        ("strong", (0.7, 0.95), (0.15, 0.5)),  # RandomApply(ColorJitter, p=0.8), plus grayscale on 20% of the rest
        ("simclr", (1.0, 1.0), (0.0, 0.0)),  # ColorJitter on every view, no blur
    ],
)
def test_colour_augmentations_jitter_gray_and_blur_as_seed(tmp_path, augment, jittered, blurred):
    """160 views each of a flat-colour folder (any change of colour is jitter or grayscale) and of a striped one
    (blur shows in `texture`). Measured: strong 0.82 jittered, 0.32 blurred; simclr 1.0 and 0."""
    colour = torch.tensor([200.0, 120.0, 60.0])
    flat = pixels(draws(dali_loader(flat_colour_folder(tmp_path / "flat"), batch_size=8, augment=augment), 10)[0])
    weak_flat = pixels(draws(dali_loader(tmp_path / "flat", batch_size=8), 10)[0])
    assert (weak_flat.mean((2, 3)) - colour).abs().max() < 3  # the crop alone keeps the colour
    changed = ((flat.mean((2, 3)) - colour).abs().amax(1) > 4).float().mean()
    assert jittered[0] <= changed <= jittered[1]

    def gray(x):  # R = G = B within rounding
        return ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 3) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 3)

    assert 0.1 < gray(flat).float().mean() < 0.3  # RandomGrayscale(p=0.2)
    stripes = make_image_folder(tmp_path / "stripes", classes=3, per_class=8, size=48)
    weak = texture(pixels(draws(dali_loader(stripes, batch_size=8, crop_size=32), 10)[0]))
    views = texture(pixels(draws(dali_loader(stripes, batch_size=8, crop_size=32, augment=augment), 10)[0]))
    assert blurred[0] <= (views < 0.2 * weak.median()).float().mean() <= blurred[1]


def run_op(op, image: np.ndarray, copies: int = 1) -> torch.Tensor:
    """A DALI CPU op on a batch of `copies` of one uint8 HWC image: its (copies, 3, H, W) int output."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=copies, num_threads=1, device_id=None, seed=0)
    def pipe():
        return op(fn.external_source(source=lambda: [image] * copies, batch=True, layout="HWC"))

    p = pipe()
    p.build()
    out = p.run()[0]
    return torch.stack([torch.from_numpy(np.array(out.at(i))) for i in range(copies)]).permute(0, 3, 1, 2).int()


DARK = np.random.default_rng(0).integers(0, 100, (12, 10, 3)).astype(np.uint8)


@pytest.mark.parametrize("brightness, contrast", [(1.3, 0.6), (0.7, 1.4), (1.0, 0.0)])
def test_brightness_contrast_matches_torchvision(brightness, contrast):
    """Contrast pivots on the image's mean gray level, as torchvision's; DALI's default pivot, 128, would put
    this dark image's contrast=0 output at 128 instead of ~50."""
    import torchvision.transforms.functional as TF

    from fastreg.pipelines.dali import brightness_contrast

    out = run_op(lambda x: brightness_contrast(x, brightness, contrast), DARK)[0]
    ref = TF.adjust_contrast(TF.adjust_brightness(torch.from_numpy(DARK).permute(2, 0, 1), brightness), contrast)
    assert (out - ref.int()).abs().max() <= 2  # uint8 rounding of the intermediate and of the gray mean


def test_zero_saturation_is_torchvision_grayscale():
    import torchvision.transforms.functional as TF
    from nvidia.dali import fn

    out = run_op(lambda x: fn.hsv(x, saturation=0.0), DARK)[0]
    ref = TF.rgb_to_grayscale(torch.from_numpy(DARK).permute(2, 0, 1), num_output_channels=3)
    assert (out - ref.int()).abs().max() <= 2


# Mostly bright pixels: brightness above 1 clamps them at 255, so that the order of the ops shows.
BRIGHT = np.random.default_rng(1).integers(40, 256, (12, 10, 3)).astype(np.uint8)


@pytest.mark.parametrize(
    "first, second", [(("brightness", 1.8), ("contrast", 0.3)), (("saturation", 1.8), ("brightness", 1.6))]
)
def test_the_strong_views_colour_ops_run_in_several_orders_across_a_batch(first, second):
    """Two of ColorJitter's factors pinned, the other two at identity, and the real random order per image: every
    output is one of torchvision's two orders (first then second, or second then first, each op clamping to
    uint8), and both orders occur in a batch of 32."""
    import torchvision.transforms.functional as TF

    factors = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, **dict([first, second])}
    out = run_op(lambda x: colour_jitter(x, order=random_order(), **factors), BRIGHT, copies=32)
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}
    image = torch.from_numpy(BRIGHT).permute(2, 0, 1)

    def in_order(a, b):
        return ops[b[0]](ops[a[0]](image, a[1]), b[1]).int()

    references = torch.stack([in_order(first, second), in_order(second, first)])
    assert (references[0] - references[1]).abs().max() > 40  # clamping makes the order visible
    worst = (out[:, None] - references[None]).abs().amax((2, 3, 4))  # (32, 2): worst pixel against each order
    # torchvision's uint8 tensor ops truncate where DALI rounds, the intermediate and the contrast pivot
    # included: measured at most 3 against the matching order, 41 or more against the other.
    assert (worst.amin(1) <= 4).all(), worst
    second_first = worst.argmin(1)
    assert 0 < second_first.sum() < len(second_first), second_first  # both orders: P(one only) = 2^-31


# ------------------------------------------------------------------ the teachers' view and small patches


def edge_folder(root: Path, copies: int, width: int = 200, height: int = 160, at=(83, 61)) -> Path:
    """Gray PNGs (lossless) with one vertical step at column at[0] (+60 to the right) and one horizontal step at
    row at[1] (+110 below), on levels 40..210: a view shows where its crop put the two steps, and which way the
    vertical one turned."""
    x, y = np.arange(width)[None, :], np.arange(height)[:, None]
    gray = 40 + 60 * (x >= at[0]) + 110 * (y >= at[1])
    (root / "c").mkdir(parents=True)
    for i in range(copies):
        Image.fromarray(np.repeat(gray[..., None], 3, -1).astype(np.uint8)).save(root / "c" / f"{i}.png")
    return root


def steps(views: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position, sign, strength) of the strongest step of each 0..255 view (N, 3, H, W) across columns
    (axis=-1) or rows (axis=-2): where the channel-summed image changes most, summed along the step, and that
    change's sign and size per pixel of its length."""
    gray = views.sum(1)
    change = gray.diff(dim=axis).sum(-1 if axis == -2 else -2)  # (N, W - 1) or (N, H - 1)
    position = change.abs().argmax(1)
    size = change.gather(1, position[:, None]).squeeze(1)
    return position, size.sign(), size.abs() / gray.shape[-1 if axis == -2 else -2]


def test_teachers_weak_view_shares_the_students_crop_box_and_flip(tmp_path):
    """data.teacher_view=weak with augment=strong, 80 views of edge_folder: wherever the teachers' view shows a
    step, the student's shows it at the same pixel (within 1) and turned the same way, while the crops and flips
    vary from view to view. On a gray image the colour ops are monotone maps of the gray level (hue and
    saturation keep gray as it is) and the blur is symmetric, so only the crop and the flip move a step; two
    independently drawn crops would put it elsewhere. Measured: every step at the same pixel."""
    ld = dali_loader(edge_folder(tmp_path, copies=8), batch_size=8, crop_size=32, augment="strong", teacher_view="weak")
    views = [(pixels(b.images), pixels(b.teacher_images)) for epoch in range(10) for b in ld.epoch(epoch)]
    student, teacher = torch.cat([s for s, _ in views]), torch.cat([t for _, t in views])
    # The teachers' view has no colour ops: gray, within the file's levels; the student's has them.
    assert (teacher[:, 0] - teacher[:, 1]).abs().max() < 0.5 and (teacher[:, 1] - teacher[:, 2]).abs().max() < 0.5
    assert teacher.min() > 39 and teacher.max() < 211
    assert ((student.amin((1, 2, 3)) < 38) | (student.amax((1, 2, 3)) > 212)).float().mean() > 0.3
    for axis in (-1, -2):
        at, sign, strength = steps(teacher, axis)
        student_at, student_sign, student_strength = steps(student, axis)
        seen = strength > 10  # flat views measure 0
        assert seen.float().mean() > 0.8, axis
        assert ((student_at - at).abs()[seen] <= 1).all(), (axis, student_at[seen], at[seen])
        assert (student_sign == sign)[seen].all() and (student_strength[seen] > 10).all(), axis
        assert at[seen].unique().numel() >= 8, axis  # the crop box varies
    _, sign, strength = steps(teacher, -1)
    assert 0.3 < (sign[strength > 10] < 0).float().mean() < 0.7  # and so does the flip, shared


def coordinate_pngs(root: Path, copies: int, width: int = 200, height: int = 160) -> Path:
    """PNGs (lossless) whose red channel is x and green channel y, 0..255 over the width and the height, and blue
    30, 50, ... names the copy: a crop shows which box of which file it was cut from."""
    x = np.tile(np.arange(width) * 255 / (width - 1), (height, 1))
    y = np.tile(np.arange(height)[:, None] * 255 / (height - 1), (1, width))
    (root / "c").mkdir(parents=True)
    for i in range(copies):
        img = np.stack([x, y, np.full((height, width), 30.0 + 20 * i)], -1)
        Image.fromarray(img.round().astype(np.uint8)).save(root / "c" / f"{i}.png")
    return root


def crop_boxes(views: torch.Tensor, width: int = 200, height: int = 160) -> dict[str, torch.Tensor]:
    """Each coordinate_pngs view's box in source pixels, from the range of its red and green: the first and last
    output pixel centres lie half an output pixel inside the box, so the range is (side - 1) / side of it."""
    p = pixels(views.float())
    xs, ys = p[:, 0] / 255 * (width - 1), p[:, 1] / 255 * (height - 1)
    side = views.shape[-1]
    w = (xs.amax((1, 2)) - xs.amin((1, 2))) * side / (side - 1)
    h = (ys.amax((1, 2)) - ys.amin((1, 2))) * side / (side - 1)
    return {
        "area": w * h / (width * height),
        "ratio": w / h,
        "left": xs.amin((1, 2)),
        "top": ys.amin((1, 2)),
        "flipped": xs[:, :, 0].mean(1) > xs[:, :, -1].mean(1),
        "file": p[:, 2].mean((1, 2)),
    }


def test_small_patches_are_random_resized_crops_of_the_whole_image(tmp_path):
    """data.small_patches=4 at 16 px over 15 epochs of 10 coordinate PNGs (480 patches): each patch a box of area
    uniform in small_patch_scale [0.05, 0.14] (torchvision's RandomResizedCrop, mean 0.095; a log-uniform area
    would give 0.087) and aspect ratio in data.ratio, anywhere in the image, with its own flip; image b's patches
    at rows b*P .. b*P+P-1. The global view keeps crop_size and data.scale. Measured: patch areas 0.0498-0.1407,
    mean 0.0962; ratios 0.742-1.334."""
    P, p = 4, 16
    ld = dali_loader(
        coordinate_pngs(tmp_path, copies=10), batch_size=4, crop_size=32, small_patches=P, small_patch_size=p
    )
    images, patches = [], []
    for epoch in range(15):  # 2 batches per epoch, 2 images left over
        for batch in ld.epoch(epoch):
            assert batch.images.shape == (4, 3, 32, 32) and batch.patches.shape == (4 * P, 3, p, p)
            assert batch.patches.is_contiguous(memory_format=torch.channels_last)
            images.append(crop_boxes(batch.images))
            patches.append(crop_boxes(batch.patches))
    images = {k: torch.cat([b[k] for b in images]) for k in images[0]}
    patches = {k: torch.cat([b[k] for b in patches]) for k in patches[0]}
    # Image-major: rows b*P .. b*P+P-1 are cut from image b's file.
    assert (patches["file"].view(-1, P) - images["file"][:, None]).abs().max() < 1
    area, ratio = patches["area"], patches["ratio"]
    assert 0.05 * 0.95 < area.min() < 0.06 and 0.13 < area.max() < 0.14 * 1.05, (area.min(), area.max())
    assert abs(area.mean() - 0.095) < 0.005 and 0.4 < (area < 0.095).float().mean() < 0.6, area.mean()
    assert 0.75 / 1.03 < ratio.min() < 0.8 and 1.25 < ratio.max() < 4 / 3 * 1.03, (ratio.min(), ratio.max())
    # Anywhere in the whole image, not in the global crop: the left edges span most of the width.
    assert patches["left"].min() < 10 and patches["left"].max() > 120
    # The patches of one image differ from each other: no two share a box.
    corner = torch.stack([patches["left"], patches["top"]], -1).view(-1, P, 2)
    apart = (corner[:, :, None] - corner[:, None]).abs().amax(-1) + torch.eye(P) * 1e3  # (images, P, P)
    assert apart.min() > 0.5
    # Each its own flip, independent of the other patches' and of the global view's.
    flipped = patches["flipped"].view(-1, P)
    assert 0.35 < flipped.float().mean() < 0.65
    assert 0.75 < (flipped.any(1) & ~flipped.all(1)).float().mean() < 0.95  # 1 - 2 / 2^P = 0.875
    assert 0.35 < (flipped == images["flipped"][:, None]).float().mean() < 0.65
    # The global view: data.scale [0.2, 1] and data.ratio, cut from the same whole decode.
    assert 0.2 * 0.95 < images["area"].min() < 0.3 and 0.7 < images["area"].max() < 1.02
    assert 0.75 / 1.03 < images["ratio"].min() and images["ratio"].max() < 4 / 3 * 1.03


def test_independent_teacher_crop_is_a_box_and_flip_of_its_own(tmp_path):
    """data.teacher_crop=independent with augment=weak (SimReg's --weak_weak without --single_aug), 120 views of
    10 coordinate PNGs: both views are colour-free, so both boxes are read off the pixels. The teachers' view is
    cut from the same file as the student's, is a random-resized crop of data.scale and data.ratio, and its box
    and flip are drawn apart from the student's: a shared box would put both corners on the same pixel and give
    the same flip every time. Measured: corners apart by more than 2 px in all 120 views, area correlation
    -0.09, the teachers' flips 0.47, agreeing with the student's in 0.50 of the views."""
    ld = dali_loader(
        coordinate_pngs(tmp_path, copies=10),
        batch_size=4,
        crop_size=32,
        teacher_view="weak",
        teacher_crop="independent",
    )
    boxes = [(crop_boxes(b.images), crop_boxes(b.teacher_images)) for epoch in range(15) for b in ld.epoch(epoch)]
    student, teacher = ({k: torch.cat([b[i][k] for b in boxes]) for k in boxes[0][0]} for i in (0, 1))
    assert len(student["area"]) == 120 and (student["file"] - teacher["file"]).abs().max() < 1
    assert 0.2 * 0.95 < teacher["area"].min() < 0.3 and 0.7 < teacher["area"].max() < 1.02
    assert 0.75 / 1.03 < teacher["ratio"].min() and teacher["ratio"].max() < 4 / 3 * 1.03
    corner = torch.stack([student["left"] - teacher["left"], student["top"] - teacher["top"]], -1)
    assert (corner.abs().amax(-1) > 2).float().mean() > 0.9, corner
    areas = torch.corrcoef(torch.stack([student["area"], teacher["area"]]))[0, 1]
    assert areas.abs() < 0.3, areas  # independent draws, not a box tied to the student's
    assert 0.3 < teacher["flipped"].float().mean() < 0.7
    assert 0.3 < (teacher["flipped"] == student["flipped"]).float().mean() < 0.7


def test_independent_teacher_crop_under_the_strong_view(tmp_path):
    """data.teacher_crop=independent with augment=strong (SimReg's --weak_strong), 80 views of edge_folder, read
    as in test_teachers_weak_view_shares_the_students_crop_box_and_flip: the teachers' view stays colour-free, and
    among the views where both show both steps, few have them on the same pixels (within 1) with the vertical one
    turned the same way, as a shared box and flip would in every view; the flips agree in about half. Measured:
    both steps seen in 67 of 80 views, 2 of them alike; flips agreeing in 0.46."""
    ld = dali_loader(
        edge_folder(tmp_path, copies=8),
        batch_size=8,
        crop_size=32,
        augment="strong",
        teacher_view="weak",
        teacher_crop="independent",
    )
    views = [(pixels(b.images), pixels(b.teacher_images)) for epoch in range(10) for b in ld.epoch(epoch)]
    student, teacher = torch.cat([s for s, _ in views]), torch.cat([t for _, t in views])
    assert (teacher[:, 0] - teacher[:, 1]).abs().max() < 0.5 and teacher.min() > 39 and teacher.max() < 211
    seen, alike = torch.ones(len(teacher), dtype=torch.bool), torch.ones(len(teacher), dtype=torch.bool)
    for axis in (-1, -2):
        (at, sign, strength), (student_at, student_sign, student_strength) = steps(teacher, axis), steps(student, axis)
        seen &= (strength > 10) & (student_strength > 10)
        alike &= ((student_at - at).abs() <= 1) & (student_sign == sign)
    flips = steps(teacher, -1)[1] == steps(student, -1)[1]
    assert seen.float().mean() > 0.5 and alike[seen].float().mean() < 0.2, (seen.float().mean(), alike[seen])
    assert 0.3 < flips[seen].float().mean() < 0.7


def test_each_patch_draws_its_own_colours(tmp_path):
    """augment=simclr jitters every view: on a flat colour, an image's patches differ in colour from each other
    and from the global view, each drawn on its own."""
    folder = flat_colour_folder(tmp_path, copies=8)
    ld = dali_loader(folder, batch_size=8, augment="simclr", small_patches=3, small_patch_size=12)
    batches = [(pixels(b.images), pixels(b.patches)) for epoch in range(3) for b in ld.epoch(epoch)]
    images = torch.cat([x for x, _ in batches]).mean((2, 3))  # (N, 3) mean colour
    patches = torch.cat([x for _, x in batches]).mean((2, 3)).view(-1, 3, 3)  # (N, P, 3)
    views = torch.cat([images[:, None], patches], 1)  # (N, 1 + P, 3)
    apart = (views[:, :, None] - views[:, None]).abs().amax(-1)  # (N, 1 + P, 1 + P)
    rows, columns = torch.triu_indices(4, 4, offset=1)
    pairs = apart[:, rows, columns]  # (N, 6): every two views of one image
    assert (pairs > 3).float().mean() > 0.9, pairs


@pytest.mark.parametrize("augment", ["strong", "simclr"])
def test_colour_augmentations_need_dali(augment):
    with pytest.raises(ValueError, match=f"data.augment={augment}"):
        DataConfig(loader="torchvision", augment=augment)


# -------------------------------------------------------------------------------- loader choice


def test_auto_picks_dali_and_falls_back_to_torchvision_with_a_warning(monkeypatch, caplog):
    assert resolve_loader("auto") == "dali"
    import importlib

    real = importlib.import_module

    def no_dali(name, *a):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_dali)
    with caplog.at_level(logging.WARNING):
        assert resolve_loader("auto") == "torchvision"
    assert "DALI cannot be imported" in caplog.text
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        resolve_loader("dali")


def test_eval_batches_follow_the_loader_choice(tmp_path):
    root = make_image_folder(tmp_path, per_class=3)
    for kind in ("dali", "torchvision"):
        x, y = next(iter(eval_batches(kind, str(root), 24, 8, 0, CPU)))
        assert x.shape == (6, 3, 24, 24) and y.tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------- GPU: mixed


@pytest.mark.parametrize(
    "options",
    [
        dict(augment="weak"),
        dict(augment="strong"),
        dict(augment="simclr"),
        dict(augment="strong", teacher_view="weak"),
        dict(augment="simclr", teacher_view="weak", small_patches=2, small_patch_size=12),
    ],
    ids=lambda v: "-".join(map(str, v.values())),
)
def test_mixed_decoder_pipelines_can_be_defined_without_a_gpu(tmp_path, options):
    """Defining the GPU graph needs no GPU, and it finds what the CPU pipeline cannot show: a named argument
    fed by a GPU node (the contrast pivot of the colour jitter) is refused there."""
    from fastreg.pipelines.dali import eval_view, train_view

    root = make_image_folder(tmp_path, per_class=4)
    index = load_index(root, progress=False)
    train_view(
        index,
        Shard(),
        data_config(root, **options),
        True,
        shuffle_seed=0,
        half=True,
        batch_size=4,
        num_threads=1,
        device_id=0,
        seed=0,
    )
    eval_view(index, Shard(), 24, True, batch_size=4, num_threads=1, device_id=0, seed=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "augment, views",
    [
        ("weak", {}),
        ("strong", {}),
        ("simclr", {}),
        ("strong", {"teacher_view": "weak", "small_patches": 3, "small_patch_size": 16}),  # whole-image decode
    ],
)
def test_mixed_decoder_gives_half_channels_last_on_the_gpu(tmp_path, augment, views):
    root = make_image_folder(tmp_path, per_class=8, size=64)
    ld = dali_loader(root, device=GPU, crop_size=32, hw_decoder_load=0.5, augment=augment, **views)
    batch = next(iter(ld.epoch(0)))
    images, labels = batch.images, batch.labels
    assert ld.name == "dali-mixed" and images.is_cuda and labels.is_cuda and batch.indices.is_cuda
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
    assert images._base is not None and images.data_ptr() == images._base.data_ptr()
    for extra, shape in ((batch.teacher_images, (4, 3, 32, 32)), (batch.patches, (12, 3, 16, 16))):
        assert (extra is None) == (not views) and (extra is None or extra.shape == shape)
        assert extra is None or (extra.is_cuda and extra.dtype == torch.float16 and torch.isfinite(extra).all())


@pytest.mark.gpu
def test_mixed_and_cpu_decoders_agree_on_eval_crops(photo_jpegs):
    """The mixed decoder (nvJPEG and the hardware decoder, with jpeg_fancy_upsampling) against the CPU one
    (libjpeg-turbo) through the same resize and crop: within the tolerance the CPU eval crops keep to
    torchvision, image by image. Without fancy upsampling the H200 measured a mean of 3.1 grey levels."""
    gpu_x, gpu_y = eval_crops(photo_jpegs, GPU)
    cpu_x, cpu_y = eval_crops(photo_jpegs, CPU)
    assert torch.equal(gpu_y, cpu_y)
    per_image = (gpu_x - cpu_x).abs().mean((1, 2, 3))
    assert per_image.max() < EVAL_TOLERANCE, per_image


@pytest.mark.gpu
def test_mixed_decoder_reads_cmyk_and_png_files(tmp_path):
    """nvJPEG does not decode every JPEG (CMYK among them, nor PNG at all): DALI must hand those to its CPU
    decoder, for training crops and eval alike, with the CPU pipeline's pixels."""
    root = make_image_folder(tmp_path, per_class=4, size=32)
    add_odd_files(root)
    ld = dali_loader(root, device=GPU, batch_size=5)
    labels = []
    for batch in ld.epoch(0):
        assert batch.images.shape == (5, 3, 24, 24) and batch.images.is_cuda
        labels += batch.labels.tolist()
    assert sorted(labels) == [0] * 4 + [1] * 6
    gpu_x, gpu_y = eval_crops(root, GPU)
    cpu_x, cpu_y = eval_crops(root, CPU)
    assert torch.equal(gpu_y, cpu_y)
    assert (gpu_x - cpu_x).abs().mean((1, 2, 3)).max() < EVAL_TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_runs_on_the_mixed_decoder(tmp_path, precision):
    """float16 batches under autocast, float32 ones for fp32 runs (fp16 input to fp32 weights would raise);
    k-NN at the end reads DALI's GPU eval batches."""
    from helpers import tiny_overrides
    from hydra import compose, initialize_config_module

    from fastreg.train import train

    data = make_image_folder(tmp_path / "data", per_class=16)
    replaced = ("trainer.device", "trainer.precision", "trainer.deterministic")
    overrides = [o for o in tiny_overrides(data, tmp_path / "run") if not o.startswith(replaced)]
    overrides += [
        "data.loader=dali",
        "trainer.device=cuda",
        f"trainer.precision={precision}",
        "trainer.epochs=1",
        f"data.val_root={data}",
    ]
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        results = train(compose("config", overrides=overrides))
    assert 0 <= results["knn20_weighted"] <= 100
