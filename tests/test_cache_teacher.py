"""The cached teacher (SimReg's --use_cache): python -m fastreg.cache_teacher writes the teacher's feature of every
image's center crop, row i for the index's sample i, and teacher.cache=PATH trains against those rows with no
teacher forward; a cache of other data or another teacher is refused by name."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import logged_lines, make_image_folder, run_two_ranks, signal_when, tiny_overrides
from hydra import compose, initialize_config_module
from PIL import Image

from fastreg import cache_teacher, cache_writer
from fastreg.cached_teacher import block_checksums
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
        cache_writer.finish(partial, tmp_path / "cache", {}, world=2)
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
    with pytest.raises(
        ValueError, match="projection=False, and this run's teacher 'cnn_small' has teacher.projection=True"
    ):
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


def test_the_cache_records_the_teachers_feature_and_input_size(data, teacher_file, cache, tmp_path):
    """Both change the features: a cache of the class token at the crop's size is refused for a run that pools
    the patch tokens too, or resizes first, naming the key. A cache written before the keys existed lacks them, and
    holds what they could only be then (cls, no resize): it is read so, not refused as damaged."""
    written = json.loads((cache / "meta.json").read_text())["teacher"]
    assert written["feature"] == "cls" and written["input_size"] is None
    for key, value, cached, given in [
        ("feature", "cls_avgpool", "'cls'", "'cls_avgpool'"),
        ("input_size", "64", "None", "64"),
    ]:
        cfg = compose_cfg(*overrides(data, teacher_file, tmp_path, f"teacher.cache={cache}", f"teacher.{key}={value}"))
        with pytest.raises(
            ValueError,
            match=f"a teacher with {key}={cached}, and this run's teacher 'cnn_small' has teacher.{key}={given}",
        ):
            build_distiller(cfg, Placement.of("fp32", True, CPU))

    older = tmp_path / "older"
    shutil.copytree(cache, older)
    rewrite_meta(older, lambda m: [m["teacher"].pop(key) for key in ("feature", "input_size")])
    assert "feature" not in json.loads((older / "meta.json").read_text())["teacher"]
    distiller = bind(older, data, teacher_file, tmp_path)
    torch.testing.assert_close(distiller.teachers[0].features, torch.from_numpy(np.load(cache / "features.npy")))
    cfg = compose_cfg(*overrides(data, teacher_file, tmp_path, f"teacher.cache={older}", "teacher.input_size=64"))
    with pytest.raises(ValueError, match="a teacher with input_size=None, and .* has teacher.input_size=64"):
        build_distiller(cfg, Placement.of("fp32", True, CPU))


def test_training_against_the_cache_runs_through_the_cli(data, cache, tmp_path):
    out = tmp_path / "run"
    base = [o for o in tiny_overrides(data, out) if o != "teacher.checkpoint=random"]  # no teacher weights needed
    args = [*base, f"teacher.cache={cache}", "trainer.epochs=2", "data.batch_size=4", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "fastreg.train", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher cnn_small: 14 cached 128-d features from" in (out / "train.log").read_text()
    losses = [m["loss"] for m in logged_lines(out) if "loss" in m]
    assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3])  # 14 images, batch 4: 3 steps an epoch


# A DINOv3 ViT-S (random weights: the trainer's seed builds the same ones in every process) seeing the 32-px
# crops resized to 48 px: 3 x 3 patches of 16 px and 5 prefix tokens
DINOV3 = ("teacher.arch=vit_small_patch16_dinov3", "teacher.input_size=48", "data.loader=torchvision")
TWO_EPOCHS = ("trainer.epochs=2", "data.batch_size=4")


def test_a_dinov3_teacher_trains_online_and_from_its_cache(data, tmp_path, caplog):
    """Online, the loss falls in 2 epochs; python -m fastreg.cache_teacher writes its class token of each center
    crop resized to teacher.input_size, as timm's own model gives it and as the online teacher does; a run on the
    cache trains too."""
    from fastreg.distributed import seed_everything
    from fastreg.train import train

    def run(out, *extra):
        with initialize_config_module("fastreg.configs", version_base="1.3"):
            raw = compose("config", overrides=[*overrides(data, "random", out, *DINOV3, *extra), *TWO_EPOCHS])
        train(raw)
        losses = [m["loss"] for m in logged_lines(out) if "loss" in m]
        assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3]), losses  # 14 images, batch 4: 3 steps an epoch
        return out

    run(tmp_path / "online")

    out = tmp_path / "cache"
    cache_teacher.main([str(out), "--dtype", "float32", *cache_overrides(data, "random", *DINOV3)])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["teacher"]["input_size"] == 48 and meta["teacher"]["feature"] == "cls" and meta["dim"] == 384
    seed_everything(0, -1, 0)  # trainer.seed's default, as the writer (and the trainer) seed the random teacher
    teacher = build_teacher(TeacherConfig(arch="vit_small_patch16_dinov3", checkpoint="random", input_size=48))
    timm_vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, dynamic_img_size=True)
    timm_vit.load_state_dict(teacher.backbone.state_dict())
    transform, index = eval_transform(32), load_index(data)
    crops = torch.stack([transform(Image.open(index.root / rel).convert("RGB")) for rel, _ in index.samples])
    with torch.no_grad():  # resized by hand (bilinear, antialiased), then timm's class token after the final norm
        resized = F.interpolate(crops, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
        expected = timm_vit.eval().forward_features(resized)[:, 0]
    rows = torch.from_numpy(np.load(out / "features.npy"))
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows, teacher(crops), rtol=1e-4, atol=1e-4)  # the online teacher, the same crops

    with caplog.at_level(logging.INFO):
        run(tmp_path / "cached", f"teacher.cache={out}")
    assert "teacher vit_small_patch16_dinov3: 14 cached 384-d features" in caplog.text


# ------------------------------------------------------------------ the cache is bound to the images' bytes


def bind(cache, data, teacher_file, tmp_path, index_root=None):
    """A training run's distiller with teacher.cache=cache, bound to index_root's (else data's) index."""
    cfg = compose_cfg(*overrides(data, teacher_file, tmp_path / "run", f"teacher.cache={cache}"))
    distiller = build_distiller(cfg, Placement.of("fp32", True, CPU))
    distiller.bind_dataset(load_index(index_root or data))
    return distiller


def test_a_folder_with_the_same_names_and_labels_but_other_pixels_is_refused(data, teacher_file, cache, tmp_path):
    """The binding used to hash only (relpath, label): folder B's pixels trained against folder A's features."""
    other = make_image_folder(tmp_path / "other", per_class=7, seed=1)
    assert load_index(other).samples == load_index(data).samples
    with pytest.raises(ValueError) as refused:
        bind(cache, data, teacher_file, tmp_path, index_root=other)
    assert str(refused.value) == (
        f"teacher.cache={cache} was computed for 14 images of {data}, and this run reads the same file names and "
        f"labels, but other bytes (images replaced, or changed in place) in {other}, another folder than the "
        "cache's: its rows would be other images' features. Write a cache for this data (python -m "
        "fastreg.cache_teacher NEW_OUT <this run's overrides>), or point data.root at the images the cache was "
        "written for"
    )


def test_images_replaced_in_place_are_refused_and_a_byte_identical_copy_is_not(data, teacher_file, tmp_path, caplog):
    mine = shutil.copytree(data, tmp_path / "mine")
    out = tmp_path / "cache"
    cache_teacher.main([str(out), "--dtype", "float32", *cache_overrides(mine, teacher_file)])
    copy = shutil.copytree(mine, tmp_path / "copy")  # the same bytes, elsewhere (a local disk's copy)
    with caplog.at_level(logging.INFO, logger="fastreg.cached_teacher"):
        bind(out, mine, teacher_file, tmp_path, index_root=copy)
    assert f"{out}: written for {mine}, read here from {copy}: the same images, byte for byte" in caplog.text
    make_image_folder(tmp_path / "new", per_class=7, seed=2)
    shutil.copy(tmp_path / "new" / "class1" / "3.jpg", mine / "class1" / "3.jpg")  # replaced, same name
    with pytest.raises(
        ValueError, match=f"the same file names and labels, but other bytes .* in {mine}, the same folder"
    ):
        bind(out, mine, teacher_file, tmp_path)


# ------------------------------------------------------------------ every malformed cache file is one line


def flip_a_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def rewrite_meta(path: Path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def resave(path: Path, change) -> None:
    np.save(path / "features.npy", change(np.load(path / "features.npy")))


DAMAGE = {
    "features_flipped_byte": (
        lambda c: flip_a_byte(c / "features.npy"),
        "features.npy, rows 0..13 (block 0 of 1): the bytes do not match their CRC-32 in meta.json: the file was "
        "damaged or changed after it was written",
    ),
    "features_cut_short": (
        lambda c: os.truncate(c / "features.npy", 4000),
        "features.npy is 4000 bytes, and its (14, 128) float32 table needs 7296: it is cut short",
    ),
    "features_empty": (lambda c: os.truncate(c / "features.npy", 0), "features.npy is empty (0 bytes)"),
    "features_missing": (lambda c: (c / "features.npy").unlink(), "features.npy does not exist"),
    "features_object_header": (  # np.load: "Object arrays cannot be loaded when allow_pickle=False"
        lambda c: (c / "features.npy").write_bytes((c / "features.npy").read_bytes().replace(b"<f4", b"|O4", 1)),
        "features.npy holds a (14, 128) object table, and its meta.json says (14, 128) float32",
    ),
    "features_garbled_header": (
        lambda c: (c / "features.npy").write_bytes((c / "features.npy").read_bytes().replace(b"False", b"Falsf", 1)),
        "features.npy has no readable .npy header: it is damaged, or not a .npy file",
    ),
    "features_wrong_dtype": (
        lambda c: resave(c, lambda t: t.astype(np.float16)),
        "features.npy holds a (14, 128) float16 table, and its meta.json says (14, 128) float32",
    ),
    "features_wrong_shape": (
        lambda c: resave(c, lambda t: t[:13]),
        "features.npy holds a (13, 128) float32 table, and its meta.json says (14, 128) float32",
    ),
    "features_non_finite": (  # with checksums that match: what no writer of this fastreg lets through
        lambda c: (
            resave(c, lambda t: np.where(np.arange(14)[:, None] == 3, np.inf, t).astype(np.float32)),
            rewrite_meta(c, lambda m: m.update(checksums=block_checksums(np.load(c / "features.npy")))),
        ),
        "features.npy, rows 0..13 (block 0 of 1): NaN or inf in row(s) 3",
    ),
    "meta_cut_short": (
        lambda c: os.truncate(c / "meta.json", 100),
        "meta.json is not readable JSON (Unterminated string starting at: line",
    ),
    "meta_missing_a_key": (
        lambda c: rewrite_meta(c, lambda m: m.pop("content")),
        "meta.json lacks content: it is damaged, or older than this fastreg",
    ),
    "meta_wrong_type": (
        lambda c: rewrite_meta(c, lambda m: m.update(samples="14")),
        "meta.json: samples is '14', not an integer",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_malformed_cache_file_is_one_line_naming_it_and_the_command(data, teacher_file, cache, tmp_path, damage):
    copy = shutil.copytree(cache, tmp_path / "copy")
    change, problem = DAMAGE[damage]
    change(copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with pytest.raises(ValueError if damage != "features_missing" else FileNotFoundError) as refused:
        bind(copy, data, teacher_file, tmp_path)
    message = str(refused.value)
    assert message.startswith(str(copy / problem.split(" ", 1)[0].rstrip(",:"))) and problem in message
    command = f"python -m fastreg.cache_teacher {copy}"
    if damage != "meta_cut_short":  # the rest comes from meta.json, which gives the arguments
        command += " --teacher 0 --dtype float32 experiment=none teacher=cnn_small"
    assert f"; delete {copy} and write it again: {command}" in message
    assert "\n" not in message and "allow_pickle" not in message
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing written over


# ------------------------------------------------------------------ non-finite rows are refused when written


def teacher_with_last_batchnorm(tmp_path, bias: float) -> Path:
    """cnn_small whose last BatchNorm adds `bias` to every channel: features about that large."""
    state = TEACHERS["cnn_small"].build().state_dict()
    state["features.18.bias"].fill_(bias)
    path = tmp_path / f"teacher_{bias}.pt"
    torch.save(state, path)
    return path


def test_float16_overflow_is_refused_naming_dtype_float32(data, tmp_path):
    """A teacher with a large last BatchNorm gave 17,774 inf entries in float16, and training skipped every step."""
    teacher = teacher_with_last_batchnorm(tmp_path, 1e6)
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as refused:
        cache_teacher.main([str(out), *cache_overrides(data, teacher)])
    assert refused.value.code.startswith("error: the teacher's features of class0/0.jpg, class0/1.jpg, ")
    assert refused.value.code.endswith(
        "overflow float16 (the largest |value| is 1e+06, float16 stops at 65504): pass --dtype float32"
    )
    assert not out.exists() and not (tmp_path / "cache.partial").exists() and not (tmp_path / "cache.lock").exists()
    cache_teacher.main([str(out), "--dtype", "float32", *cache_overrides(data, teacher)])
    assert np.load(out / "features.npy").max() == pytest.approx(1e6)


def test_non_finite_features_are_refused_naming_the_teacher(data, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as refused:
        cache_teacher.main(
            [
                str(out),
                "--dtype",
                "float32",
                *cache_overrides(data, teacher_with_last_batchnorm(tmp_path, float("nan"))),
            ]
        )
    assert "are not finite (NaN or inf) even in float32: the teacher's weights hold NaN or inf" in refused.value.code
    assert "check teacher.checkpoint" in refused.value.code and not out.exists()


# ------------------------------------------------------------------ one writer at a time


LOCK_HOLDER = """
import sys
from pathlib import Path
from fastreg.lock import writer_lock
with writer_lock(Path(sys.argv[1]), "python -m fastreg.cache_teacher"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding OUT.lock as a running cache_teacher does (fastreg.lock, torch-free: it starts in a
    fraction of a second), until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(data, teacher_file, tmp_path, caplog):
    """Two cache_teacher runs into one OUT both said "written", and the cache held 2,505 of 4,041 zero rows."""
    out, host = tmp_path / "cache", socket.gethostname()
    holder = hold_lock(out)
    with pytest.raises(SystemExit) as refused:
        cache_teacher.main([str(out), *cache_overrides(data, teacher_file)])
    assert refused.value.code == (
        f"error: {out} is being written by another python -m fastreg.cache_teacher (pid {holder.pid} on {host}), "
        f"which holds {out}.lock: wait for it to finish, or write another folder"
    )
    assert not out.exists() and not (tmp_path / "cache.partial").exists()
    holder.communicate("")  # the first writer finishes, and removes its lock
    assert holder.returncode == 0 and not (tmp_path / "cache.lock").exists()

    holder = hold_lock(out)
    holder.kill()  # a writer killed with its lock file in place
    holder.wait()
    assert (tmp_path / "cache.lock").read_text() == f"pid {holder.pid} on {host}\n"
    with caplog.at_level(logging.WARNING, logger="fastreg.lock"):
        cache_teacher.main(
            [str(out), "--dtype", "float32", *cache_overrides(data, teacher_file, "data.loader=torchvision")]
        )
    assert f"{out}.lock: taking over the lock of a writer that died (pid {holder.pid} on {host})" in caplog.text
    assert not (tmp_path / "cache.lock").exists()
    features = torch.from_numpy(np.load(out / "features.npy"))
    torch.testing.assert_close(features, reference_features(data, teacher_file), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("sig, when", [("TERM", "imports"), ("USR1", "rows")])
def test_a_stop_signal_exits_75_with_one_line_and_leaves_nothing(teacher_file, tmp_path, sig, when):
    """SIGTERM or SIGUSR1 ended cache_teacher with 143 or 138 and no word, which a Slurm script does not requeue,
    leaving OUT.partial and OUT.lock. Stopped while torch imports, or while the rows are written (64 images at crop
    224: seconds), it exits 75 with one line, leaves no OUT, OUT.partial or OUT.lock, and the same command starts
    over."""
    data = make_image_folder(tmp_path / "data", per_class=32)
    out, partial = tmp_path / "cache", tmp_path / "cache.partial"
    arguments = [str(out), *cache_overrides(data, teacher_file, "data.crop_size=224", "data.loader=torchvision")]
    start = time.monotonic()

    def ready() -> bool:
        return time.monotonic() > start + 1 if when == "imports" else (partial / "features.npy").exists()

    signum = signal.Signals[f"SIG{sig}"]
    proc = signal_when([sys.executable, "-m", "fastreg.cache_teacher", *arguments], tmp_path, None, signum, ready)
    assert proc.returncode == 75 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        f"SIG{sig} received while it writes the cache: stopped at once; nothing was written to {out}, and "
        "cache.lock is released: the same command starts over; python -m fastreg.cache_teacher exits with code 75 "
        "(EX_TEMPFAIL)"
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("cache")]  # no OUT, OUT.partial, OUT.lock
    if when == "rows":
        cache_teacher.main(arguments)
        assert np.load(out / "features.npy").shape == (64, 128)


def test_the_readme_recipe_composes_without_trainer_out_dir(tmp_path, monkeypatch):
    """`python -m fastreg.cache_teacher OUT experiment=... teacher.checkpoint=... data.root=...` failed with
    "HydraConfig was not set full_key: trainer.out_dir"."""
    monkeypatch.chdir(tmp_path)
    cfg = cache_writer.compose_config(
        [
            "experiment=simreg_byol_r50_r18_cached",
            "teacher.checkpoint=pretrain_res50x1.pth.tar",
            f"data.root={tmp_path}",
        ]
    )
    assert cfg.trainer.out_dir == str(tmp_path / "runs" / "simreg_byol_r50_r18_cached")  # hydra.run.dir's
    assert cfg.teachers[0].cache is None and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argument, message",
    [
        (
            "trainer.epoch=3",
            "error: Could not override 'trainer.epoch'.\nTo append to your config use +trainer.epoch=3\n"
            "Key 'epoch' not in 'TrainerConfig'",
        ),
        ("student=resnet19", "error: In 'config': Could not find 'student/resnet19'"),
        (
            "data.root=/no/such/folder",
            "error: data.root=/no/such/folder does not exist: point data.root at the training ImageFolder",
        ),
        ("head.kind=mlp3", "error: head.kind='mlp3' is not one of"),
    ],
    ids=["unknown_key", "unknown_group_option", "missing_root", "invalid_value"],
)
def test_user_errors_are_one_line_and_exit_1(data, teacher_file, tmp_path, argument, message):
    with pytest.raises(SystemExit) as refused:
        cache_teacher.main([str(tmp_path / "cache"), *cache_overrides(data, teacher_file), argument])
    assert refused.value.code.startswith(message)  # sys.exit(str): exit status 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.lock").exists()
