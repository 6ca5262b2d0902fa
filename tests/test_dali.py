"""DALI pipelines in CPU mode (device_id=None), against the torchvision reference loader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from fastreg.config import DataConfig
from fastreg.index import load_index
from fastreg.pipelines import IMAGENET_MEAN, IMAGENET_STD, build_loader, eval_batches, resolve_loader
from fastreg.pipelines.dali import DaliLoader, Shard, dali_eval_loader
from fastreg.pipelines.torchvision import eval_loader
from helpers import make_image_folder, make_photo_folder

CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def data_config(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"loader": "dali", "root": str(root), "crop_size": 24, "batch_size": 4, "workers": 1, **kw})


def dali_loader(root: Path, shard: Shard = Shard(), checkpoint=None, **kw) -> DaliLoader:
    cfg = data_config(root, **kw)
    return DaliLoader(cfg, load_index(root, progress=False), shard=shard, seed=0, device=CPU,
                      memory_format=torch.channels_last, checkpoint=checkpoint)


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
    images, labels = next(iter(ld.epoch(0)))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32  # FLOAT on CPU
    assert images.is_contiguous(memory_format=torch.channels_last)
    nhwc = images._base  # the iterator's own output tensor: the view made no copy
    assert nhwc is not None and nhwc.shape == (4, 24, 24, 3) and nhwc.is_contiguous()
    assert images.data_ptr() == nhwc.data_ptr() and images.stride() == (24 * 24 * 3, 1, 24 * 3, 3)
    assert labels.dtype == torch.long and labels.shape == (4,)
    assert images.min() < 0 < images.max()  # ImageNet-normalized


def test_contiguous_format_when_channels_last_is_off(tmp_path):
    root = make_image_folder(tmp_path, per_class=4)
    cfg = data_config(root)
    ld = DaliLoader(cfg, load_index(root, progress=False), shard=Shard(), seed=0, device=CPU,
                    memory_format=torch.contiguous_format)
    images, _ = next(iter(ld.epoch(0)))
    assert images.is_contiguous()


# --------------------------------------------------------------------------------- shards, epochs


def test_two_shards_partition_every_epoch_and_reshuffle(tmp_path):
    root = one_image_per_class(tmp_path, 24)
    shards = [dali_loader(root, Shard(r, 2), batch_size=3) for r in range(2)]
    orders = []
    for epoch in range(3):
        seen = [torch.cat([y for _, y in ld.epoch(epoch)]).tolist() for ld in shards]
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
        seen = [[y.tolist() for _, y in ld.epoch(epoch)] for ld in shards]
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


def test_eval_center_crop_matches_torchvision(tmp_path):
    """Resize the shorter side to 256/224 of the crop, center crop, no flip: the pixels of the reference."""
    root = coordinate_images(tmp_path, copies=2, size=60)
    for img in (root / "c").iterdir():  # a non-square image shows a wrong resize or crop offset
        Image.open(img).resize((90, 60)).save(img, quality=95)
    (dali_x, dali_y), = list(dali_eval_loader(str(root), 32, 2, 1, CPU))
    ref_x, ref_y = next(iter(eval_loader(str(root), 32, 2, 0)))
    assert torch.equal(dali_y, ref_y)
    # Within one output pixel (4.6 of 255 on this ramp): torchvision floors the resized long side (55 here),
    # DALI rounds it (56), which moves the crop by a fraction of a pixel.
    assert (pixels(dali_x) - pixels(ref_x)).abs().mean() < 4.0


# ---------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stop_after", [1, 3, 4, 9])  # inside epoch 0, at its end, inside epoch 2
def test_resume_from_state_continues_with_the_same_batches(tmp_path, stop_after):
    root = make_image_folder(tmp_path, per_class=9)  # 18 images, batch 4: 4 batches per epoch, 2 left over

    def run(ld, epochs, stop=None):
        out = []
        for epoch in range(ld.position[0], epochs):
            for images, labels in ld.epoch(epoch):
                out.append((images.clone(), labels.clone()))  # the iterator reuses its buffers
                if len(out) == stop:
                    return out
        return out

    straight = run(dali_loader(root), 3)
    first = dali_loader(root)
    before = run(first, 3, stop=stop_after)
    after = run(dali_loader(root, checkpoint=first.state_dict()), 3)
    assert len(before) + len(after) == len(straight) == 12
    for (x, y), (x_ref, y_ref) in zip(before + after, straight):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


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


# ------------------------------------------------------------------------- parity with torchvision


def reference_loader(root: Path, **kw):
    cfg = data_config(root, loader="torchvision", workers=0, **kw)
    return build_loader(cfg, rank=0, world_size=1, seed=0, device=CPU)


def draws(ld, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [(x.clone(), y.clone()) for epoch in range(epochs) for x, y in ld.epoch(epoch)]
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
    for name, ld in (("dali", dali_loader(root, batch_size=16, crop_size=32)),
                     ("torchvision", reference_loader(root, batch_size=16, crop_size=32))):
        area, flipped = crop_geometry(draws(ld, epochs=30)[0])
        stats[name] = area
        assert 0.4 < flipped.float().mean() < 0.6, name
        assert 0.18 < area.min() < 0.24 and area.max() < 1.05, name  # scale [0.25, 1]: none below 0.25
        assert (area < 0.45).float().mean() > 0.2, name  # U(0.2, 1) puts 31% below 0.45
    assert abs(stats["dali"].mean() - stats["torchvision"].mean()) < 0.04
    assert abs(stats["dali"].median() - stats["torchvision"].median()) < 0.06


# ------------------------------------------------------------------------------ strong augmentation


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


def run_op(op, image: np.ndarray) -> torch.Tensor:
    """A DALI CPU op on one uint8 HWC image: its (3, H, W) int output."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return op(fn.external_source(source=lambda: [image], batch=True, layout="HWC"))

    p = pipe()
    p.build()
    return torch.from_numpy(np.array(p.run()[0][0])).permute(2, 0, 1).int()


DARK = np.random.default_rng(0).integers(0, 100, (12, 10, 3)).astype(np.uint8)


@pytest.mark.parametrize("brightness, contrast", [(1.3, 0.6), (0.7, 1.4), (1.0, 0.0)])
def test_brightness_contrast_matches_torchvision(brightness, contrast):
    """Contrast pivots on the image's mean gray level, as torchvision's; DALI's default pivot, 128, would put
    this dark image's contrast=0 output at 128 instead of ~50."""
    import torchvision.transforms.functional as TF

    from fastreg.pipelines.dali import brightness_contrast

    out = run_op(lambda x: brightness_contrast(x, brightness, contrast), DARK)
    ref = TF.adjust_contrast(TF.adjust_brightness(torch.from_numpy(DARK).permute(2, 0, 1), brightness), contrast)
    assert (out - ref.int()).abs().max() <= 2  # uint8 rounding of the intermediate and of the gray mean


def test_zero_saturation_is_torchvision_grayscale():
    from nvidia.dali import fn
    import torchvision.transforms.functional as TF

    out = run_op(lambda x: fn.hsv(x, saturation=0.0), DARK)
    ref = TF.rgb_to_grayscale(torch.from_numpy(DARK).permute(2, 0, 1), num_output_channels=3)
    assert (out - ref.int()).abs().max() <= 2


def test_strong_augmentation_needs_dali():
    with pytest.raises(ValueError, match="data.augment=strong"):
        DataConfig(loader="torchvision", augment="strong")


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


@pytest.mark.gpu
def test_mixed_decoder_gives_half_channels_last_on_the_gpu(tmp_path):
    root = make_image_folder(tmp_path, per_class=8, size=64)
    cfg = data_config(root, crop_size=32, hw_decoder_load=0.5)
    ld = DaliLoader(cfg, load_index(root, progress=False), shard=Shard(), seed=0, device=torch.device("cuda", 0),
                    memory_format=torch.channels_last)
    images, labels = next(iter(ld.epoch(0)))
    assert ld.name == "dali-mixed" and images.is_cuda and labels.is_cuda
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
    assert images._base is not None and images.data_ptr() == images._base.data_ptr()


@pytest.mark.gpu
def test_mixed_and_cpu_decoders_agree_on_eval_crops(tmp_path):
    root = one_image_per_class(tmp_path, 6, size=64)
    gpu_x, gpu_y = next(iter(dali_eval_loader(str(root), 32, 6, 1, torch.device("cuda", 0))))
    cpu_x, cpu_y = next(iter(dali_eval_loader(str(root), 32, 6, 1, CPU)))
    assert torch.equal(gpu_y.cpu(), cpu_y)
    assert (pixels(gpu_x.float().cpu()) - pixels(cpu_x)).abs().mean() < 2.0  # nvJPEG vs libjpeg-turbo IDCT


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_runs_on_the_mixed_decoder(tmp_path, precision):
    """float16 batches under autocast, float32 ones for fp32 runs (fp16 input to fp32 weights would raise);
    k-NN at the end reads DALI's GPU eval batches."""
    from hydra import compose, initialize_config_module

    from fastreg.train import train
    from helpers import tiny_overrides

    data = make_image_folder(tmp_path / "data", per_class=16)
    replaced = ("trainer.device", "trainer.precision", "trainer.deterministic")
    overrides = [o for o in tiny_overrides(data, tmp_path / "run") if not o.startswith(replaced)]
    overrides += ["data.loader=dali", "trainer.device=cuda", f"trainer.precision={precision}", "trainer.epochs=1",
                  f"data.val_root={data}"]
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        results = train(compose("config", overrides=overrides))
    assert 0 <= results["knn"] <= 100
