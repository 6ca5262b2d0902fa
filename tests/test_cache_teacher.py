"""The cached teacher (SimReg's --use_cache): python -m fastreg.cache_teacher writes the teacher's feature of every
image's center crop, row i for the index's sample i, and teacher.cache=PATH trains against those rows with no
teacher forward; a cache of other data or another teacher is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import logged_lines, make_image_folder, run_two_ranks, tiny_overrides
from hydra import compose, initialize_config_module
from PIL import Image

from fastreg import cache_teacher
from fastreg.config import TeacherConfig, to_config
from fastreg.distiller import build_distiller
from fastreg.index import load_index
from fastreg.pipelines import Batch
from fastreg.pipelines.pil_folder import eval_transform
from fastreg.placement import Placement
from fastreg.teachers import TEACHERS, build_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A cnn_small teacher's weights (random, fixed), as a user's checkpoint file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "cnn_small.pt"
    torch.save(TEACHERS["cnn_small"].build().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=7)  # 14: a short last batch


def cache_overrides(data, teacher_file, *extra):
    """cache_teacher's training overrides, without trainer.out_dir: the README's commands pass none."""
    unwanted = ("teacher.checkpoint=", "trainer.out_dir=")
    base = [o for o in tiny_overrides(data, Path("unused")) if not o.startswith(unwanted)]
    return [*base, f"teacher.checkpoint={teacher_file}", "eval.batch_size=4", *extra]


def overrides(data, teacher_file, out_dir, *extra):
    """A training run's overrides."""
    return [*cache_overrides(data, teacher_file, *extra), f"trainer.out_dir={out_dir}"]


def reference_features(data, teacher_file, crop_size=32) -> torch.Tensor:
    """(N, D): the teacher's forward on each image's PIL center crop, one image at a time, in the index's order."""
    cfg = TeacherConfig(arch="cnn_small", checkpoint=str(teacher_file))
    teacher, transform = build_teacher(cfg), eval_transform(crop_size)
    index = load_index(data)
    with torch.no_grad():
        return torch.cat(
            [teacher(transform(Image.open(index.root / rel).convert("RGB"))[None]) for rel, _ in index.samples]
        )


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float16", 1e-3)])
def test_rows_are_the_teachers_features_of_each_center_crop(data, teacher_file, tmp_path, dtype, tol):
    out = tmp_path / "cache"
    cache_teacher.main([str(out), "--dtype", dtype, *cache_overrides(data, teacher_file, "data.loader=torchvision")])
    table = np.load(out / "features.npy")
    expected = reference_features(data, teacher_file)
    assert table.dtype == np.dtype(dtype) and table.shape == expected.shape == (14, 128)
    torch.testing.assert_close(
        torch.from_numpy(table).float(), expected, rtol=tol, atol=tol * expected.abs().max().item()
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["samples"] == 14 and meta["dim"] == 128 and meta["teacher"]["arch"] == "cnn_small"
    assert meta["view"] == {"resize": 37, "center_crop": 32}
    assert not (tmp_path / "cache.partial").exists()
    with pytest.raises(SystemExit, match="exists: delete it"):  # never overwritten
        cache_teacher.main([str(out), *cache_overrides(data, teacher_file)])


def test_dali_cache_matches_the_pil_one_within_resampling(data, teacher_file, tmp_path):
    """DALI's eval view is torchvision's within resampling differences (pipelines/dali.py eval_view)."""
    cache_teacher.main(
        [str(tmp_path / "c"), "--dtype", "float32", *cache_overrides(data, teacher_file, "data.loader=dali")]
    )
    table = torch.from_numpy(np.load(tmp_path / "c" / "features.npy"))
    cos = F.cosine_similarity(table, reference_features(data, teacher_file), dim=1)
    assert cos.min() > 0.99


def test_two_ranks_write_their_shards_into_one_cache(data, teacher_file, tmp_path):
    out = tmp_path / "cache"
    proc = run_two_ranks(
        cache_teacher.__file__,
        [str(out), "--dtype", "float32", *cache_overrides(data, teacher_file, "data.loader=torchvision")],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = reference_features(data, teacher_file)
    torch.testing.assert_close(torch.from_numpy(np.load(out / "features.npy")), expected, rtol=1e-5, atol=1e-5)


def test_a_folder_some_rank_did_not_write_into_is_not_completed(tmp_path):
    """Rank 0 renames the cache only when every rank marked its rows written in the folder rank 0 sees."""
    partial = tmp_path / "cache.partial"
    partial.mkdir()
    (partial / "rank0.done").touch()
    with pytest.raises(OSError, match=r"rank\(s\) \[1\] wrote their rows into another .* every rank shares"):
        cache_teacher.finish(partial, tmp_path / "cache", {}, world=2)
    assert not (tmp_path / "cache").exists()


def compose_cfg(*items):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return to_config(compose("config", overrides=list(items)))


@pytest.fixture(scope="module")
def cache(data, teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cnn_small"
    cache_teacher.main(
        [str(out), "--dtype", "float32", *cache_overrides(data, teacher_file, "data.loader=torchvision")]
    )
    return out


def test_the_loss_regresses_the_cached_rows_of_the_batchs_positions(data, teacher_file, cache, tmp_path):
    cfg = compose_cfg(*overrides(data, teacher_file, tmp_path, f"teacher.cache={cache}", "head=linear", "loss=simreg"))
    distiller = build_distiller(cfg, Placement.of("fp32", True, CPU))
    distiller.bind_dataset(load_index(data))
    assert distiller.implementations()["teachers"] == ["cached"]
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    positions = torch.tensor([13, 0, 5, 5])
    loss, _ = distiller(Batch(images, torch.zeros(4, dtype=torch.long), positions))
    preds = distiller.model(images)[0][0]
    rows = torch.from_numpy(np.load(cache / "features.npy"))[positions]
    expected = (2 - 2 * F.cosine_similarity(preds, rows, dim=1)).mean()  # SimReg's loss, written out
    torch.testing.assert_close(loss, expected)


def test_a_cache_of_other_data_or_another_teacher_is_refused(data, teacher_file, cache, tmp_path):
    from fastreg.trainer import Trainer

    more = make_image_folder(tmp_path / "more", per_class=8)
    cfg = compose_cfg(*overrides(more, teacher_file, tmp_path / "a", f"teacher.cache={cache}"))
    with pytest.raises(ValueError, match="computed for 14 images of .* another list of images"):
        Trainer(cfg)
    cfg = compose_cfg(
        *overrides(data, teacher_file, tmp_path / "b", f"teacher.cache={cache}", "teacher.projection=true")
    )
    with pytest.raises(ValueError, match="projection=False, and this run's teacher 'cnn_small' has projection=True"):
        build_distiller(cfg, Placement.of("fp32", True, CPU))
    other = overrides(data, teacher_file.with_name("other.pt"), tmp_path / "d", f"teacher.cache={cache}")
    with pytest.raises(
        ValueError, match="teacher.checkpoint=.*other.pt is not the checkpoint teacher.cache=.* computed"
    ):
        build_distiller(compose_cfg(*other), Placement.of("fp32", True, CPU))
    with pytest.raises(
        FileNotFoundError, match="no meta.json there. Write the cache with python -m fastreg.cache_teacher"
    ):
        build_distiller(
            compose_cfg(*overrides(data, teacher_file, tmp_path / "c", f"teacher.cache={tmp_path}")),
            Placement.of("fp32", True, CPU),
        )


def test_training_against_the_cache_runs_through_the_cli(data, cache, tmp_path):
    out = tmp_path / "run"
    base = [o for o in tiny_overrides(data, out) if o != "teacher.checkpoint=random"]  # no teacher weights needed
    args = [*base, f"teacher.cache={cache}", "trainer.epochs=2", "data.batch_size=4", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "fastreg.train", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher cnn_small: 14 cached 128-d features from" in (out / "train.log").read_text()
    losses = [m["loss"] for m in logged_lines(out) if "loss" in m]
    assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3])  # 14 images, batch 4: 3 steps an epoch
