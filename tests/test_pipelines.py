"""The torchvision reference loader and the synthetic loader behind one interface (DALI: test_dali.py)."""

import numpy as np
import pytest
import torch
from helpers import add_odd_files, make_image_folder, noise
from PIL import Image
from torchvision import transforms as T

from fastreg.config import DataConfig
from fastreg.index import load_index
from fastreg.pipelines import build_loader
from fastreg.pipelines.pil_folder import IndexedImages, eval_loader, train_transform

CPU = torch.device("cpu")


def loader(root, rank=0, world=1, **kw):
    cfg = DataConfig(loader="torchvision", root=str(root), crop_size=24, batch_size=4, workers=0, **kw)
    return build_loader(cfg, rank=rank, world_size=world, seed=0, device=CPU)


def test_batches_are_channels_last_and_normalized(tmp_path):
    ld = loader(make_image_folder(tmp_path, per_class=8))
    assert ld.name == "torchvision" and len(ld) == 4
    batch = next(iter(ld.epoch(0)))
    images, labels = batch.images, batch.labels
    assert images.shape == (4, 3, 24, 24) and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.long and images.min() < 0  # ImageNet-normalized


def test_ranks_see_disjoint_shards_covering_the_data(tmp_path):
    root = make_image_folder(tmp_path, per_class=8)
    shards = [list(loader(root, rank=r, world=2).sampler) for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(16))


def test_same_epoch_same_views_new_epoch_new_views(tmp_path):
    root = make_image_folder(tmp_path, per_class=8)
    a = torch.cat([b.images for b in loader(root).epoch(3)])
    b = torch.cat([b.images for b in loader(root).epoch(3)])
    c = torch.cat([b.images for b in loader(root).epoch(4)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_weak_augmentation_is_simregs():
    ops = train_transform(DataConfig(root="x", crop_size=224)).transforms
    rrc = ops[0]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.scale == (0.2, 1.0) and rrc.size == (224, 224)
    assert isinstance(ops[1], T.RandomHorizontalFlip) and ops[1].p == 0.5
    assert not any(isinstance(op, (T.ColorJitter, T.RandomGrayscale, T.GaussianBlur)) for op in ops)


def test_eval_loader_resizes_then_center_crops(tmp_path):
    ld = eval_loader(str(make_image_folder(tmp_path, per_class=3, size=50)), crop_size=32, batch_size=8, workers=0)
    ops = ld.dataset.dataset.transform.transforms  # a Subset: the eval shard of the IndexedImages
    assert ops[0].size == round(32 * 256 / 224) and ops[1].size == (32, 32)
    images, labels = next(iter(ld))
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_cmyk_and_png_files_are_read_as_rgb(tmp_path):
    """The index keeps a CMYK JPEG and a PNG named .jpg; the reference loader decodes both by content, to RGB:
    the PNG losslessly, the CMYK JPEG as R = (255 - C)(255 - K) / 255 of its decoded planes."""
    root = make_image_folder(tmp_path, per_class=4)
    add_odd_files(root)
    index = load_index(root, progress=False)
    dataset = IndexedImages(index, np.asarray)  # the loader's decode, untransformed: (H, W, 3) uint8
    decoded = {rel: dataset[i][0] for i, (rel, _) in enumerate(index.samples)}
    assert np.array_equal(decoded["class1/png_named_jpg.jpg"], np.asarray(noise()))
    cmyk = np.asarray(Image.open(root / "class1" / "cmyk.jpg")).astype(float)
    formula = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    assert decoded["class1/cmyk.jpg"].shape == formula.shape
    assert np.abs(decoded["class1/cmyk.jpg"] - formula).max() <= 1
    images, labels = next(iter(eval_loader(str(root), crop_size=24, batch_size=10, workers=0)))
    assert images.shape == (10, 3, 24, 24) and labels.tolist() == [0] * 4 + [1] * 6


def test_synthetic_loader():
    cfg = DataConfig(loader="synthetic", crop_size=16, batch_size=3, synthetic_batches=5)
    ld = build_loader(cfg, rank=0, world_size=1, seed=0, device=CPU)
    batches = list(ld.epoch(0))
    assert len(ld) == len(batches) == 5 and ld.name == "synthetic"
    images = batches[0].images
    assert images.shape == (3, 3, 16, 16) and images.is_contiguous(memory_format=torch.channels_last)
    assert batches[0].teacher_images is None and batches[0].patches is None


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_synthetic_loader_gives_the_teachers_view_and_small_patches(memory_format):
    """Fixed random tensors of the configured shapes, in the images' memory format; the images and labels are
    those of the same loader without them."""
    options = dict(loader="synthetic", crop_size=16, batch_size=3, synthetic_batches=2)
    cfg = DataConfig(augment="strong", teacher_view="weak", small_patches=4, small_patch_size=8, **options)
    ld = build_loader(cfg, rank=0, world_size=1, seed=0, device=CPU, memory_format=memory_format)
    first, second = ld.epoch(0)
    assert first.teacher_images.shape == (3, 3, 16, 16) and first.patches.shape == (12, 3, 8, 8)
    for x in (first.images, first.teacher_images, first.patches):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=memory_format)
    assert torch.equal(second.patches, first.patches) and torch.equal(second.teacher_images, first.teacher_images)
    assert not torch.equal(first.teacher_images, first.images)
    assert 0.8 < first.patches.std() < 1.2 and abs(first.patches.mean()) < 0.2
    plain = next(iter(build_loader(DataConfig(**options), rank=0, world_size=1, seed=0, device=CPU).epoch(0)))
    assert torch.equal(plain.images, first.images) and torch.equal(plain.labels, first.labels)


def test_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class subfolders"):
        loader(tmp_path / "empty")
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader(make_image_folder(tmp_path / "small", classes=1, per_class=3))


def test_views_do_not_depend_on_worker_count(tmp_path):
    root = make_image_folder(tmp_path, per_class=8)
    a = torch.cat([b.images for b in loader(root).epoch(1)])
    cfg = DataConfig(loader="torchvision", root=str(root), crop_size=24, batch_size=4, workers=2)
    b = torch.cat([b.images for b in build_loader(cfg, rank=0, world_size=1, seed=0, device=CPU).epoch(1)])
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "option, key",
    [({"augment": "strong"}, "data.augment"), ({"small_patches": 2, "small_patch_size": 16}, "data.small_patches")],
)
def test_dali_only_views_stop_when_auto_falls_back_to_torchvision(tmp_path, monkeypatch, option, key):
    """data.loader=auto without DALI: the view the config asks for is refused by name, never trained without."""
    import fastreg.pipelines as pipelines

    monkeypatch.setattr(pipelines, "resolve_loader", lambda kind: "torchvision")
    cfg = DataConfig(loader="auto", root=str(make_image_folder(tmp_path)), crop_size=24, batch_size=4, **option)
    with pytest.raises(ValueError, match=f"^{key} is built with DALI ops, and DALI cannot be imported here"):
        build_loader(cfg, rank=0, world_size=1, seed=0, device=CPU)
