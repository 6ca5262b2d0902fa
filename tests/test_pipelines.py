"""The torchvision reference loader and the synthetic loader behind one interface (DALI: test_dali.py)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    add_odd_files,
    loop_link,
    make_image_folder,
    noise,
    overwrite_in_place,
    run_two_processes,
    stopped_by_a_file,
    tiny_overrides,
)
from PIL import Image
from torchvision import transforms as T

from fastreg.config import DataConfig
from fastreg.index import load_index
from fastreg.pipelines import build_loader
from fastreg.pipelines.pil_folder import IndexedImages, eval_loader, train_transform

CPU = torch.device("cpu")


def loader(root, rank=0, world=1, **kw):
    cfg = DataConfig(
        **{"loader": "torchvision", "root": str(root), "crop_size": 24, "batch_size": 4, "workers": 0, **kw}
    )
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


@pytest.mark.parametrize(
    "change, reason, workers",
    [
        (overwrite_in_place, "not an image", 2),
        (Path.unlink, "missing", 0),
        (loop_link, "unreadable: Too many levels of symbolic links", 0),
    ],
    ids=["corrupted_in_place_in_a_worker", "removed", "made_unreadable"],
)
def test_a_file_that_changed_after_indexing_is_named_and_left_out_next_time(tmp_path, change, reason, workers):
    """PIL's error ("cannot identify image file <_io.BufferedReader ...>") came from a DataLoader worker, or the loop
    itself, without the command that re-checks the folder; the next run read the same index and stopped again."""
    root = make_image_folder(tmp_path / "data", per_class=16)  # 32 images, batch 4: every one read in an epoch
    ld = loader(root, workers=workers)
    change(root / "class1" / "10.jpg")
    with pytest.raises(ValueError, match=stopped_by_a_file(root, "class1/10.jpg", reason)):
        for _ in ld.epoch(0):
            pass
    rerun = loader(root, workers=workers, max_bad_fraction=0.05)
    assert "class1/10.jpg" not in dict(rerun.index.samples) and len(rerun.index.samples) == 31
    assert sum(len(batch.indices) for batch in rerun.epoch(0)) == 28  # 7 full batches of the 31


def test_the_eval_loader_names_a_file_that_changed_after_indexing(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=16)
    batches = eval_loader(str(root), crop_size=24, batch_size=4, workers=2)
    overwrite_in_place(root / "class0" / "3.jpg")
    with pytest.raises(ValueError, match=stopped_by_a_file(root, "class0/3.jpg", "not an image")):
        list(batches)
    again = eval_loader(str(root), crop_size=24, batch_size=4, workers=0, max_bad_fraction=0.05)
    assert torch.cat([labels for _, labels in again]).tolist() == [0] * 15 + [1] * 16


TESTS = Path(__file__).resolve().parent
# python -m fastreg.train, where one rank's first image of epoch 0 is rewritten in place once the index is built
CHANGED_ON_ONE_RANK = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import torch.distributed as dist
import fastreg.trainer
from helpers import overwrite_in_place

fit = fastreg.trainer.Trainer.fit


def fit_after_a_file_changed(self):
    if self.rank == int(os.environ["FAILING_RANK"]):
        self.loader.sampler.set_epoch(0)
        rel = self.loader.index.samples[next(iter(self.loader.sampler))][0]
        overwrite_in_place(self.loader.index.root / rel)
        print("CHANGED", rel, flush=True)
    dist.barrier()
    return fit(self)


fastreg.trainer.Trainer.fit = fit_after_a_file_changed
from fastreg.train import main

main()
"""


@pytest.mark.parametrize("failing", [1, 0], ids=["rank_1", "rank_0_which_holds_the_store"])
def test_a_file_that_changed_on_one_rank_stops_every_rank_with_its_message(tmp_path, monkeypatch, failing):
    """Only the rank that read the file knew of it: the other rank stopped with gloo's "Connection closed by peer"
    traceback (with NCCL it waits in its all-reduce until the timeout). Launched as the README's srun script does."""
    data = make_image_folder(tmp_path / "data", per_class=16)
    script = tmp_path / "train.py"
    script.write_text(CHANGED_ON_ONE_RANK)
    monkeypatch.setenv("FAILING_RANK", str(failing))
    ranks = run_two_processes(script, [*tiny_overrides(data, tmp_path / "run"), "data.loader=torchvision"])
    errors = [rank.stderr.strip().splitlines()[-1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1] and "Traceback" not in ranks[0].stderr + ranks[1].stderr
    changed = re.search(r"^CHANGED (\S+)$", ranks[failing].stdout, re.MULTILINE).group(1)
    message = errors[failing].removeprefix("error: ")
    assert re.fullmatch(stopped_by_a_file(data, changed, "not an image"), message)
    if failing == 1:
        assert errors[0] == f"error: rank 1 stopped, and with it every rank: {message}"
    else:  # the store, where rank 0 posted its error, ended with its process
        assert errors[1] == (
            "error: rank 0 ended, and with it every rank: its own output says why (the process group's store, where "
            "it would have posted its error, lived in its process)"
        )


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
