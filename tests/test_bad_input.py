"""Bad input, through the real entry point (fastreg.train.train on a composed config): every case ends in an
error, or a warning and a completed run, whose message names the file, key or value and says what to do,
and nothing that was there is written over. docs/reliability.md tables these cases with their messages."""

from __future__ import annotations

import builtins
import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import add_bad_files, add_odd_files, logged_lines, make_image_folder, tiny_overrides
from hydra import compose, initialize_config_module
from hydra.errors import CompactHydraException, ConfigCompositionException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from fastreg import preflight
from fastreg.checkpointer import ENTRIES
from fastreg.export import export_student
from fastreg.students import SmallCNN
from fastreg.train import train

ROOT = os.geteuid() == 0  # root reads files whatever their mode says, and writes in any directory


def compose_cfg(overrides: list[str]):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def moco_teacher(path: Path, projection_dim: int) -> Path:
    """A MoCo-v2-layout checkpoint of the cnn_small teacher (128-d) with a 128-64-`projection_dim` projection."""
    state = {f"module.encoder_q.{k}": v for k, v in SmallCNN((32, 64, 128)).state_dict().items()}
    state.update(
        {
            "module.encoder_q.fc.0.weight": torch.randn(64, 128),
            "module.encoder_q.fc.0.bias": torch.zeros(64),
            "module.encoder_q.fc.2.weight": torch.randn(projection_dim, 64),
            "module.encoder_q.fc.2.bias": torch.zeros(projection_dim),
        }
    )
    torch.save({"state_dict": state}, path)
    return path


@dataclass
class Trained:
    """One epoch of a tiny run whose teacher regresses a 32-d projection: the checkpoint resumes start from."""

    overrides: list[str]
    checkpoint: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    tmp = tmp_path_factory.mktemp("trained")
    data = make_image_folder(tmp / "data", per_class=8)  # 16 images, batch 8: 2 steps per epoch
    teacher = moco_teacher(tmp / "moco_cnn_small.pth", projection_dim=32)
    overrides = tiny_overrides(data, tmp / "run") + [
        f"teacher.checkpoint={teacher}",
        "teacher.projection=true",
        "trainer.epochs=1",
    ]
    train(compose_cfg(overrides))
    return Trained(overrides, tmp / "run" / "ckpt_epoch0001.pt")


@dataclass
class Bench:
    """A case's folder: fresh data, an output directory, and the trained run to resume from."""

    tmp: Path
    trained: Trained
    monkeypatch: pytest.MonkeyPatch

    def __post_init__(self):
        self.data = make_image_folder(self.tmp / "data", per_class=8)
        self.run = self.tmp / "run"

    def fresh(self, *extra: str) -> list[str]:
        return tiny_overrides(self.data, self.run) + ["trainer.epochs=1", *extra]

    def nothing_started(self) -> None:
        """Refused before the work: no output folder, so no checkpoint, log or metrics either."""
        assert not self.run.exists()

    def unwritable(self, name: str) -> Path:
        """A folder that cannot be created or written to, by anyone."""
        if ROOT:  # root writes in any directory: a path under a regular file cannot be created by anyone
            (self.tmp / "file").write_text("")
            return self.tmp / "file" / name
        (self.tmp / "readonly").mkdir(exist_ok=True)
        (self.tmp / "readonly").chmod(0o500)
        return self.tmp / "readonly" / name

    def resume(self, *extra: str) -> list[str]:
        """The trained run's command in another out_dir (a setting that may change), its checkpoint copied there."""
        self.run.mkdir()
        shutil.copy(self.trained.checkpoint, self.run)
        return self.trained.overrides + [f"trainer.out_dir={self.run}", *extra]


@dataclass
class Expect:
    overrides: list[str]
    error: type[BaseException] | None  # None: the run completes, and `says` is in its warnings
    says: list[str]  # parts of the message: what is wrong, where, and what to do
    check: Callable[[], None] = field(default=lambda: None)  # anything else that must hold afterwards


CASES: list[Callable[[Bench], Expect]] = []


def case(make: Callable[[Bench], Expect]) -> Callable[[Bench], Expect]:
    CASES.append(make)
    return make


# ---------------------------------------------------------------------------------------------- images


def bad_and_odd_files(b: Bench) -> None:
    """Corrupt, truncated and zero-byte files, which are left out, and a CMYK JPEG and a PNG named .jpg, which
    both loaders decode and train on."""
    add_bad_files(b.data)
    add_odd_files(b.data)


@case
def bad_jpegs_dali(b: Bench) -> Expect:
    bad_and_odd_files(b)
    return Expect(
        b.fresh("data.loader=dali", "data.max_bad_fraction=0.5"),
        None,
        [
            "left out 3 of 21 images",
            "class1/corrupt.jpg (not an image); class1/truncated.jpg (truncated: ",
            "class1/zero.jpg (zero bytes)",
            "bad_files.txt",
        ],
    )


@case
def bad_jpegs_torchvision(b: Bench) -> Expect:
    bad_and_odd_files(b)
    return Expect(
        b.fresh("data.loader=torchvision", "data.max_bad_fraction=0.5"),
        None,
        [
            "left out 3 of 21 images",
            "class1/corrupt.jpg (not an image); class1/truncated.jpg (truncated: ",
            "class1/zero.jpg (zero bytes)",
            "bad_files.txt",
        ],
    )


@case
def too_many_bad_jpegs(b: Bench) -> Expect:
    bad_and_odd_files(b)
    return Expect(
        b.fresh(),
        ValueError,
        [
            f"{b.data}: 3 of 21 images (14.29%) fail the decode check",
            "class1/corrupt.jpg (not an image)",
            "bad_files.txt",
            "Fix or remove those files, or raise data.max_bad_fraction",
        ],
    )


@case
def unreadable_jpeg(b: Bench) -> Expect:
    locked = b.data / "class0" / "0.jpg"
    locked.chmod(0)
    if ROOT:  # root reads it anyway: make its open fail as it would for anyone else
        real_open = builtins.open

        def open_as_user(file, *args, **kwargs):
            if str(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        b.monkeypatch.setattr(builtins, "open", open_as_user)
    return Expect(
        b.fresh("data.max_bad_fraction=0.1"),
        None,
        ["left out 1 of 16 images", "class0/0.jpg (unreadable: permission denied)", "bad_files.txt"],
    )


@case
def empty_data_folder(b: Bench) -> Expect:
    (b.tmp / "empty").mkdir()
    return Expect(
        b.fresh(f"data.root={b.tmp / 'empty'}"),
        FileNotFoundError,
        [f"dataset root {b.tmp / 'empty'} is empty", "point data.root at an ImageFolder"],
    )


@case
def no_class_subfolders(b: Bench) -> Expect:
    flat = b.tmp / "flat"
    flat.mkdir()
    shutil.copy(b.data / "class0" / "0.jpg", flat)
    return Expect(
        b.fresh(f"data.root={flat}"),
        FileNotFoundError,
        [f"dataset root {flat} has no class subfolders", "point data.root at an ImageFolder"],
    )


@case
def batch_larger_than_the_shard(b: Bench) -> Expect:
    return Expect(
        b.fresh("data.batch_size=64"),
        ValueError,
        [f"{b.data} has 16 usable images: fewer than one batch of 64", "lower data.batch_size"],
    )


# ---------------------------------------------------------------------------------------------- teacher


@case
def teacher_missing(b: Bench) -> Expect:
    path = b.tmp / "moco_v2.pth"
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        FileNotFoundError,
        [f"teacher.checkpoint={path} does not exist: set teacher.checkpoint to the teacher's weights file"],
        b.nothing_started,
    )


@case
def teacher_random_bytes(b: Bench) -> Expect:
    path = b.tmp / "moco_v2.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [f"teacher checkpoint {path} is not a readable PyTorch checkpoint", "fetch the file again"],
    )


@case
def teacher_cut_short(b: Bench) -> Expect:
    path = moco_teacher(b.tmp / "moco_v2.pth", projection_dim=32)
    path.write_bytes(path.read_bytes()[:500_000])  # an interrupted download: 500 kB of 1.2 MB
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [
            f"teacher checkpoint {path} is not a readable PyTorch checkpoint (RuntimeError: "
            "PytorchStreamReader failed reading zip archive: failed finding central directory): the file is "
            "damaged, cut short",
            "fetch the file again",
        ],
    )


@case
def teacher_text_file(b: Bench) -> Expect:
    path = b.tmp / "moco_v2.pth"
    path.write_text("<html>404 Not Found</html>\n")  # what a failed download saves
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [
            f"teacher checkpoint {path} is a text file, not a PyTorch checkpoint (it begins '<html>404 Not "
            "Found</html>')",
            "fetch the file again",
        ],
    )


@case
def teacher_zero_bytes(b: Bench) -> Expect:
    path = b.tmp / "moco_v2.pth"
    path.write_bytes(b"")
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [f"teacher checkpoint {path} is empty (0 bytes)", "fetch it again"],
    )


@case
def teacher_of_another_architecture(b: Bench) -> Expect:
    path = b.tmp / "cnn_two_stages.pth"
    torch.save(SmallCNN((32, 64)).state_dict(), path)  # cnn_small has a third stage
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [
            f"teacher checkpoint {path} (format torchvision, detected) does not fit teacher.arch=cnn_small",
            "10 backbone keys are missing from the checkpoint: features.14.weight, features.15.weight",
            "Check teacher.arch, or set the layout with teacher.format=",
        ],
    )


@case
def teacher_format_not_detected(b: Bench) -> Expect:
    path = b.tmp / "other.pth"
    torch.save({"encoder.conv.weight": torch.zeros(1), "classifier.weight": torch.zeros(1)}, path)
    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [
            f"teacher checkpoint {path}: no known layout matches its keys (classifier.weight, encoder.conv.weight)",
            "wrong teacher.arch, or set the layout with teacher.format=<torchvision|",
        ],
    )


class RunsCode:
    """Unpickled, it calls os.system: what a checkpoint from an untrusted source may hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@case
def teacher_pickle_that_runs_code(b: Bench) -> Expect:
    path, marker = b.tmp / "moco_v2.pth", b.tmp / "code_ran"
    state = {f"module.encoder_q.{k}": v for k, v in SmallCNN((32, 64, 128)).state_dict().items()}
    torch.save({"state_dict": state, "args": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the payload works: a plain torch.load runs it
    assert marker.exists()
    marker.unlink()

    def code_never_ran():
        assert not marker.exists()

    return Expect(
        b.fresh(f"teacher.checkpoint={path}"),
        ValueError,
        [
            f"teacher checkpoint {path} is refused",
            "Python object (posix.system)",
            "can run any code",
            "convert it once in a trusted environment",
        ],
        code_never_ran,
    )


@case
def teacher_width_differs_from_the_heads(b: Bench) -> Expect:
    """The checkpoint's heads output the 32-d projection of the teacher file it was trained with; that file
    was replaced by one with a 16-d projection, under the same config."""
    overrides = b.resume()
    replaced = moco_teacher(b.tmp / "moco_cnn_small.pth", projection_dim=16)
    saved = b.run / b.trained.checkpoint.name
    state = torch.load(saved, weights_only=True)
    state["config"]["teachers"][0]["checkpoint"] = str(replaced)
    torch.save(state, saved)
    return Expect(
        overrides + [f"teacher.checkpoint={replaced}"],
        ValueError,
        [
            f"checkpoint {saved} does not fit this run's heads (checkpoint vs this run): "
            "0.7.weight (32, 128) vs (16, 128), 0.7.bias (32,) vs (16,)",
            "Resume with the teacher weights and settings the checkpoint was trained with",
        ],
    )


# ---------------------------------------------------------------------------------------------- config


@case
def unknown_key(b: Bench) -> Expect:
    return Expect(
        b.fresh("trainer.epoch=3"),
        ConfigCompositionException,
        ["Could not override 'trainer.epoch'", "Key 'epoch' not in 'TrainerConfig'"],
    )


@case
def unknown_group_option(b: Bench) -> Expect:
    return Expect(
        b.fresh("student=resnet19"),
        MissingConfigException,
        ["Could not find 'student/resnet19'", "Available options in 'student'", "resnet18"],
    )


@case
def invalid_value(b: Bench) -> Expect:
    return Expect(
        b.fresh("head.kind=mlp3"),
        ValueError,
        ["head.kind='mlp3' is not one of linear, mlp2, mlp2_bn, simreg4, seed, mlp"],
    )


@case
def key_added_with_plus(b: Bench) -> Expect:
    """hydra's hint for a key it does not know is +key=; the settings dropped what it added without a word."""
    return Expect(
        b.fresh("+optim.lrr=0.1"),
        ValueError,
        [
            "optim.lrr is not a setting (optim has: name, base_lr, momentum, weight_decay, schedule, "
            "warmup_epochs, min_lr, recipe_batch; did you mean optim.min_lr or optim.base_lr?): fix its name or "
            "remove it",
        ],
        b.nothing_started,
    )


@case
def eval_knn_k_zero(b: Bench) -> Expect:
    return Expect(
        b.fresh(f"data.val_root={b.data}", "eval.knn_k=0"),
        ValueError,
        ["eval.knn_k must be >= 1 (the neighbours that vote), got 0"],
        b.nothing_started,
    )


@case
def eval_batch_size_zero(b: Bench) -> Expect:
    return Expect(
        b.fresh(f"data.val_root={b.data}", "eval.batch_size=0"),
        ValueError,
        ["eval.batch_size must be > 0, got 0"],
        b.nothing_started,
    )


@case
def small_patches_larger_than_the_crop(b: Bench) -> Expect:
    return Expect(
        b.fresh("loss=seed", "data.small_patches=2", "data.small_patch_size=400"),
        ValueError,
        ["data.small_patch_size=400 is larger than data.crop_size=32", "set data.small_patch_size <= 32"],
        b.nothing_started,
    )


@case
def resume_with_another_config(b: Bench) -> Expect:
    overrides = b.resume("trainer.epochs=2", "optim.base_lr=1.0", "trainer.log_every=2", "data.workers=1")
    return Expect(
        overrides,
        ValueError,
        [
            f"checkpoint {b.run / 'ckpt_epoch0001.pt'} was written with other settings, which change the "
            "result (checkpoint -> this run): optim.base_lr 2.0 -> 1.0; trainer.epochs 1 -> 2. ",
            "A run folder holds one run: resume with the checkpoint's settings, or run these in another folder "
            "with name=<another> (runs/<another>) or trainer.out_dir=<folder>",
            f"or start afresh here with trainer.resume=none (the files already in {b.run} move into {b.run}/previous/)",
            "or continue the checkpoint's weights under the new settings with trainer.resume_force=true",
        ],
    )


@case
def resume_with_another_config_forced(b: Bench) -> Expect:
    overrides = b.resume("trainer.epochs=2", "optim.base_lr=1.0", "trainer.resume_force=true")

    def trained_on():
        assert torch.load(b.run / "ckpt_epoch0002.pt", weights_only=True)["step"] == 4

    return Expect(
        overrides,
        None,
        ["trainer.resume_force=true: resuming from", "optim.base_lr 2.0 -> 1.0; trainer.epochs 1 -> 2"],
        trained_on,
    )


def resume_from_a_checkpoint_without(entry: str) -> Callable[[Bench], Expect]:
    """A trainer checkpoint that lacks `entry`, one that every trainer checkpoint has and a resume reads: refused
    before any part loads, where a KeyError came (or a part loaded and the next did not)."""

    def make(b: Bench) -> Expect:
        overrides = b.resume()
        saved = b.run / b.trained.checkpoint.name
        state = torch.load(saved, weights_only=True)
        del state[entry]
        torch.save(state, saved)
        return Expect(
            overrides,
            ValueError,
            [
                f"{saved} has no '{entry}' entry, which every trainer checkpoint has (this file holds ",
                "it was written by something else, or changed. Resume from another checkpoint, "
                "trainer.resume=<out_dir>/ckpt_epochNNNN.pt (or auto: the newest readable one in trainer.out_dir), "
                "or start afresh with trainer.resume=none",
            ],
        )

    make.__name__ = f"resume_from_a_checkpoint_without_{entry}"
    return make


for _entry in ENTRIES:
    case(resume_from_a_checkpoint_without(_entry))


@case
def resume_from_an_exported_student(b: Bench) -> Expect:
    overrides = b.resume()
    student = b.tmp / "student.pt"
    export_student(b.trained.checkpoint, student)
    return Expect(
        overrides + [f"trainer.resume={student}"],
        ValueError,
        [
            f"{student} is an exported student backbone (a bare state_dict, what fastreg.export writes), not a "
            "trainer checkpoint: it holds the student's weights alone. Resume from another checkpoint",
            "or start afresh with trainer.resume=none",
        ],
    )


# ---------------------------------------------------------------------------------------------- before the work
# fastreg.preflight: the paths, the memory of a step and the folders written, before the data, teacher or index.


def path_missing(case_id: str, key: str, name: str, fix: str, *extra: str) -> Callable[[Bench], Expect]:
    """`key` names no file or folder (a typo): refused before any work, naming the key and the fix. `extra`:
    overrides, {data} the training folder. A typo in data.val_root trained every epoch, saved, and only then
    failed, naming data.root."""

    def make(b: Bench) -> Expect:
        path = b.tmp / name
        return Expect(
            b.fresh(*(e.format(data=b.data) for e in extra), f"{key}={path}"),
            FileNotFoundError,
            [f"{key}={path} does not exist: {fix}"],
            b.nothing_started,
        )

    make.__name__ = case_id
    return make


for _missing in [
    (
        "val_root_missing",
        "data.val_root",
        "vall",
        "point data.val_root at the labelled ImageFolder of the k-NN evaluation, or set data.val_root=null to train "
        "without one",
    ),
    (
        "knn_train_root_missing",
        "data.knn_train_root",
        "bank",
        "point data.knn_train_root at the ImageFolder of the k-NN memory bank, or set data.knn_train_root=null to "
        "use data.root",
        "data.val_root={data}",
    ),
    (
        "file_list_missing",
        "data.file_list",
        "train.txt",
        "point data.file_list at the 'relpath label' list of data.root's images",
    ),
    ("teacher_cache_missing", "teacher.cache", "features_r50", "point teacher.cache at the folder python -m fastreg"),
    ("resume_checkpoint_missing", "trainer.resume", "ckpt_epoch0010.pt", "pass trainer.resume=<another checkpoint>"),
]:
    case(path_missing(*_missing))


@case
def val_root_of_other_classes(b: Bench) -> Expect:
    """A val folder of other classes than the bank's gave k-NN figures of labels that name other classes."""
    val = make_image_folder(b.tmp / "val", classes=3, per_class=1)
    return Expect(
        b.fresh(f"data.val_root={val}"),
        FileNotFoundError,
        [
            f"data.root={b.data} and data.val_root={val} have different class folders (only in data.val_root: "
            "class2): the k-NN's labels index them, so point both at ImageFolders of the same classes"
        ],
        b.nothing_started,
    )


@case
def val_root_without_images(b: Bench) -> Expect:
    """A val folder whose class folders are still empty passed the path check and failed after the training."""
    val = b.tmp / "val"
    for name in ("class0", "class1"):
        (val / name).mkdir(parents=True)
    return Expect(
        b.fresh(f"data.val_root={val}"),
        FileNotFoundError,
        [f"no image files under {val} in the class subfolders; check data.val_root"],
        b.nothing_started,
    )


@case
def knn_train_root_without_class_folders(b: Bench) -> Expect:
    bank = b.tmp / "bank"
    make_image_folder(bank, classes=1, per_class=2)
    for jpeg in (bank / "class0").iterdir():
        jpeg.rename(bank / jpeg.name)
    (bank / "class0").rmdir()
    return Expect(
        b.fresh(f"data.val_root={b.data}", f"data.knn_train_root={bank}"),
        FileNotFoundError,
        [f"dataset root {bank} has no class subfolders: point data.knn_train_root at an ImageFolder"],
        b.nothing_started,
    )


@case
def val_root_is_a_file(b: Bench) -> Expect:
    path = b.tmp / "val.tar"
    path.write_bytes(b"not a folder")
    return Expect(
        b.fresh(f"data.val_root={path}"),
        FileNotFoundError,
        [f"data.val_root={path} is not a directory: point data.val_root at the labelled ImageFolder"],
        b.nothing_started,
    )


@case
def several_paths_wrong(b: Bench) -> Expect:
    """Every wrong path in one message: one fix, one rerun."""
    val, teacher = b.tmp / "vall", b.tmp / "moco_v2.pth"
    return Expect(
        b.fresh(f"data.val_root={val}", f"teacher.checkpoint={teacher}"),
        FileNotFoundError,
        [
            f"2 paths of this config are wrong:\n  data.val_root={val} does not exist: ",
            f"\n  teacher.checkpoint={teacher} does not exist: ",
        ],
        b.nothing_started,
    )


@case
def step_larger_than_the_memory(b: Bench) -> Expect:
    return Expect(
        b.fresh("data.batch_size=1000000"),
        ValueError,
        [
            "one training step needs at least ",
            "(the images, 12.3 GB: data.batch_size=1000000 x (data.crop_size=32^2) pixels x 3 channels + the "
            "student's activations kept for its backward, ",
            "of host RAM: lower data.batch_size, data.small_patches, data.small_patch_size or data.crop_size",
        ],
        b.nothing_started,
    )


@case
def teacher_patches_do_not_tile_the_crop(b: Bench) -> Expect:
    """A 32-px crop into a ViT of 14-px patches stopped the first step on timm's assertion, after the teacher
    loaded and the data was indexed."""
    return Expect(
        b.fresh("teacher.arch=vit_small_patch14_dinov2"),
        ValueError,
        [
            "teacher.arch=vit_small_patch14_dinov2 cuts its input into 14 x 14 px patches, and data.crop_size=32 is "
            "not a multiple of 14: set teacher.input_size=224 (a multiple of 14: the teacher resizes every image to "
            "it), or data.crop_size to a multiple of 14 (28 is the nearest)"
        ],
        b.nothing_started,
    )


@case
def teacher_larger_than_the_memory(b: Bench) -> Expect:
    """A teacher whose weights alone do not fit (here DINOv3 ViT-L's 1.2 GB in float32 in a 1 GB memory, given
    in place of the host's RAM) was only found out by loading it: refused first, naming its cache."""
    b.monkeypatch.setattr(preflight, "device_memory", lambda device: (10**9, "host RAM"))
    return Expect(
        b.fresh("teacher.arch=vit_large_patch16_dinov3"),
        ValueError,
        [
            "one training step needs at least ",
            "'vit_large_patch16_dinov3': weights 1.2 GB (0.30B parameters in float32), forward ",
            "more than the 1.0 GB of host RAM. Lower data.batch_size, store it in bf16 (teacher.dtype=bf16: half its "
            "weights), or train without teacher 'vit_large_patch16_dinov3''s forward: cache its features: python -m "
            "fastreg.cache_teacher OUT <same overrides>, then train with teacher.cache=OUT",
        ],
        b.nothing_started,
    )


@case
def cache_not_writable(b: Bench) -> Expect:
    """An unwritable FASTREG_CACHE failed with a PermissionError traceback after the whole decode check."""
    cache = b.unwritable("cache")
    b.monkeypatch.setenv("FASTREG_CACHE", str(cache))

    def nothing_in_out_dir():  # out_dir is created first (it is checked writable too), and left empty
        assert list(b.run.iterdir()) == []

    return Expect(
        b.fresh(),
        OSError,
        [
            f"FASTREG_CACHE={cache}: the folder {cache / 'index'}, where fastreg keeps the dataset indexes, is not "
            "a writable directory (",
            "export FASTREG_CACHE=<a writable folder>, or fix its permissions",
        ],
        nothing_in_out_dir,
    )


@case
def xdg_cache_not_writable(b: Bench) -> Expect:
    cache = b.unwritable("xdg")
    b.monkeypatch.delenv("FASTREG_CACHE")
    b.monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return Expect(
        b.fresh(),
        OSError,
        [
            f"XDG_CACHE_HOME={cache} (FASTREG_CACHE is not set): the folder {cache / 'fastreg' / 'index'}, where "
            "fastreg keeps the dataset indexes, is not a writable directory",
            "export FASTREG_CACHE=<a writable folder>",
        ],
    )


@case
def demo_cache_not_writable(b: Bench) -> Expect:
    cache = b.unwritable("cache")
    b.monkeypatch.setenv("FASTREG_CACHE", str(cache))
    return Expect(
        ["experiment=demo", f"trainer.out_dir={b.run}"],
        OSError,
        [
            f"FASTREG_CACHE={cache}: the folder {cache / 'demo'}, where fastreg keeps the demo's data and teacher, "
            "is not a writable directory",
            "export FASTREG_CACHE=<a writable folder>",
        ],
        b.nothing_started,
    )


@case
def final_evaluation_missing(b: Bench) -> Expect:
    """A finished run without its final k-NN (it failed, or data.val_root was given only now) does it when run
    again, instead of resuming at the end and exiting 0 with nothing done."""

    def evaluated():
        [line] = [m for m in logged_lines(b.run) if "eval/nn1" in m]
        assert line["step"] == 2

    return Expect(
        b.resume(f"data.val_root={b.data}", "eval.knn_k=3"),
        None,
        [
            f"the run in {b.run} had finished: 1 of 1 epochs, step 2, saved in {b.run / 'ckpt_epoch0001.pt'}, "
            f"without its final k-NN evaluation in {b.run / 'metrics.jsonl'}: evaluating it now"
        ],
        evaluated,
    )


# ---------------------------------------------------------------------------------------------- output


@case
def out_dir_not_writable(b: Bench) -> Expect:
    run = b.unwritable("run")
    return Expect(
        b.fresh(f"trainer.out_dir={run}"),
        OSError,
        [
            f"trainer.out_dir={run} is not a writable directory",
            "Pass trainer.out_dir=<a directory you can write to>, or fix its permissions",
        ],
    )


@case
def disk_full_during_a_save(b: Bench) -> Expect:
    overrides = b.resume("trainer.epochs=2", "trainer.resume_force=true")
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if ".ckpt_epoch0002.pt.tmp" not in str(getattr(f, "name", f)):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    b.monkeypatch.setattr(torch, "save", save_until_full)

    def nothing_half_written():
        assert sorted(p.name for p in b.run.glob("*.pt*")) == ["ckpt_epoch0001.pt"]

    return Expect(
        overrides,
        OSError,
        [
            f"the disk is full (No space left on device): {b.run / 'ckpt_epoch0002.pt'} was not written, its "
            f"partial file .ckpt_epoch0002.pt.tmp{os.getpid()} was removed, and the newest checkpoint there, "
            "ckpt_epoch0001.pt, is intact",
            "run the same command again: it resumes from ckpt_epoch0001.pt",
        ],
        nothing_half_written,
    )


# ---------------------------------------------------------------------------------------------- the table


def shown(error: BaseException) -> str:
    """The message the CLI prints: hydra prints OmegaConf's error (the unknown key) under its own."""
    if isinstance(error, CompactHydraException) and isinstance(error.__cause__, OmegaConfBaseException):
        return f"{error}\n{error.__cause__}"
    return str(error)


def snapshot(folder: Path) -> dict[Path, bytes]:
    """The bytes of every checkpoint and teacher file under `folder`."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.suffix in (".pt", ".pth") and p.is_file()}


@pytest.mark.parametrize("make", CASES, ids=[make.__name__ for make in CASES])
def test_bad_input(make, tmp_path, monkeypatch, trained, caplog):
    bench = Bench(tmp_path, trained, monkeypatch)
    expect = make(bench)
    before = snapshot(tmp_path)
    with caplog.at_level(logging.INFO):
        if expect.error is None:
            train(compose_cfg(expect.overrides))
            message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        else:
            with pytest.raises(expect.error) as raised:
                train(compose_cfg(expect.overrides))
            message = shown(raised.value)
    print(f"[{make.__name__}] {message}")  # pytest -s shows them: docs/reliability.md quotes them
    for part in expect.says:
        assert part in message
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before  # nothing written over
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no partial file left
    expect.check()


@pytest.mark.parametrize("full_error", [False, True])
def test_cli_prints_the_message_alone(tmp_path, full_error):
    """A user's error ends `python -m fastreg.train` with its message on stderr and exit code 1; hydra's
    HYDRA_FULL_ERROR=1 brings back the traceback."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    missing = tmp_path / "moco_v2.pth"
    args = tiny_overrides(data, tmp_path / "run") + [f"teacher.checkpoint={missing}", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"teacher.checkpoint={missing} does not exist" in proc.stderr
    if full_error:
        assert "Traceback" in proc.stderr
    else:
        assert proc.stderr.strip().splitlines() == [
            f"error: teacher.checkpoint={missing} does not exist: set teacher.checkpoint to the teacher's weights "
            "file (teacher.checkpoint=random: an untrained teacher, for benchmarks and tests)"
        ]


def test_a_rerun_does_the_final_evaluation_that_failed(tmp_path, caplog):
    """The finished run's final k-NN failed (a val folder of files named .jpg that are no images: the check before
    the work walks folders, it opens no file), after its last checkpoint. Run again once the folder is fixed, the
    same command evaluates instead of resuming at the end and exiting 0 with nothing done; a third time there is
    nothing left to do."""
    data, val, run = make_image_folder(tmp_path / "data", per_class=8), tmp_path / "val", tmp_path / "run"
    for name in ("class0", "class1"):
        (val / name).mkdir(parents=True)
        for i in range(3):
            (val / name / f"{i}.jpg").write_text("not a jpeg yet")
    overrides = tiny_overrides(data, run) + ["trainer.epochs=1", f"data.val_root={val}", "eval.knn_k=3"]
    with pytest.raises(ValueError, match=f"{val}: none of the 6 images passes the decode check"):
        train(compose_cfg(overrides))
    saved = (run / "ckpt_epoch0001.pt").read_bytes()
    assert not [m for m in logged_lines(run) if "eval/nn1" in m]

    make_image_folder(val, per_class=3, seed=1)
    with caplog.at_level(logging.INFO):
        results = train(compose_cfg(overrides))
    assert "without its final k-NN evaluation" in caplog.text and "evaluating it now" in caplog.text
    [evaluation] = [m for m in logged_lines(run) if "eval/nn1" in m]
    assert evaluation == {"step": 2, **{f"eval/{k}": v for k, v in results.items()}}

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(compose_cfg(overrides)) == results  # the logged results, not evaluated again
    print(next(r.getMessage() for r in caplog.records if "had finished" in r.getMessage()))  # docs quote it
    assert (
        f"the run in {run} had finished: 1 of 1 epochs, step 2, saved in {run / 'ckpt_epoch0001.pt'}; its k-NN "
        f"results are in {run / 'metrics.jsonl'}. Nothing left to do: to train longer raise trainer.epochs (with "
        "trainer.resume_force=true), to start over pass trainer.resume=none, to run another beside it pass "
        "name=<another> (runs/<another>)"
    ) in caplog.text
    assert len([m for m in logged_lines(run) if "eval/nn1" in m]) == 1
    assert (run / "ckpt_epoch0001.pt").read_bytes() == saved
