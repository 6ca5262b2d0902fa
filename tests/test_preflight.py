"""fastreg.preflight and the cache folders: what a run needs is checked before any work, and the command-line tools
name FASTREG_CACHE before they decode or extract anything. The bad inputs through fastreg.train are in
test_bad_input.py's table; here the parts: the memory estimate, what the check creates, and its place."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_image_folder, tiny_overrides
from hydra import compose, initialize_config_module

import fastreg.eval
import fastreg.eval.feature_cache
import fastreg.index
import fastreg.trainer
from fastreg import preflight
from fastreg.config import to_config
from fastreg.students import STUDENTS, Student


def load(*overrides: str):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def tiny(tmp_path, *extra: str):
    data = make_image_folder(tmp_path / "data", per_class=2)
    return load(*tiny_overrides(data, tmp_path / "run"), *extra)


def blocked_cache(tmp_path, monkeypatch):
    """FASTREG_CACHE under a regular file: no one can create it, root included."""
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"
    monkeypatch.setenv("FASTREG_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("arch", list(STUDENTS))
def test_every_student_measures_what_it_keeps_for_its_backward(arch):
    """On the meta device: no memory, no compute, whatever the student."""
    with torch.device("meta"):
        student = Student(arch)
    assert 0 < preflight.saved_bytes(student, 64) < preflight.saved_bytes(student, 128)


def test_the_step_is_the_images_and_the_students_activations(tmp_path):
    """batch x (views x crop^2 + P x patch^2) x 3 x 4 bytes, and batch x (saved(crop) + P x saved(patch))."""
    cfg = tiny(
        tmp_path,
        "loss=seed",
        "data.augment=strong",
        "data.teacher_view=weak",
        "data.small_patches=2",
        "data.small_patch_size=16",
    )
    images, activations = preflight.step_bytes(cfg, torch.device("cpu"))
    assert images == 8 * (2 * 32**2 + 2 * 16**2) * 3 * 4
    with torch.device("meta"):
        student = Student("cnn_tiny")
    assert activations == 8 * (preflight.saved_bytes(student, 32) + 2 * preflight.saved_bytes(student, 16))
    cfg.trainer.precision = "bf16"  # autocast keeps half-size activations; the CPU loaders still hand over float32
    assert preflight.step_bytes(cfg, torch.device("cpu")) == (images, activations // 2)
    cfg.trainer.compile = True  # inductor may recompute activations instead of keeping them: not counted
    assert preflight.step_bytes(cfg, torch.device("cpu")) == (images, 0)


def test_the_host_ram_is_shared_by_the_processes_on_the_host(monkeypatch):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert preflight.device_memory(torch.device("cpu")) == (ram, "host RAM")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert preflight.device_memory(torch.device("cpu")) == (ram // 2, "host RAM per process (2 processes on this host)")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["cnn_tiny", "resnet18"])
def test_the_activations_are_a_lower_bound_of_what_the_gpu_holds(arch):
    """What the CUDA allocator holds after the student's forward (its output and everything autograd keeps for
    the backward) is at least the estimate."""
    with torch.device("meta"):
        estimate = 8 * preflight.saved_bytes(Student(arch), 96)
    device = torch.device("cuda")
    student = Student(arch).to(device)
    images = torch.randn(8, 3, 96, 96, device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    features = student(images)
    held = torch.cuda.memory_allocated() - before
    assert estimate <= held < 2 * estimate  # a lower bound, and close: the estimate counts what is there
    features.sum().backward()


# ---------------------------------------------------------------------------------------------- the check


def test_a_good_config_creates_the_output_and_cache_folders_and_nothing_in_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "cache"))
    cfg = tiny(tmp_path, f"data.val_root={tmp_path / 'data'}")
    preflight.check_before_work(cfg)
    assert list((tmp_path / "run").iterdir()) == []
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / "index"]
    assert list((tmp_path / "cache" / "index").iterdir()) == []


def test_the_knn_folders_must_have_the_same_classes(tmp_path):
    """A label is an index into the class folders: a bank of other classes than the queries' would give wrong
    figures, or stop the final evaluation after the training."""
    val = make_image_folder(tmp_path / "val", classes=3, per_class=1)
    with pytest.raises(FileNotFoundError) as error:
        preflight.check_paths(tiny(tmp_path, f"data.val_root={val}"))
    assert str(error.value) == (
        f"data.root={tmp_path / 'data'} and data.val_root={val} have different class folders (only in data.val_root: "
        "class2): the k-NN's labels index them, so point both at ImageFolders of the same classes"
    )
    bank = make_image_folder(tmp_path / "bank", classes=3, per_class=1)
    preflight.check_paths(tiny(tmp_path, f"data.val_root={val}", f"data.knn_train_root={bank}"))  # the bank's classes


def test_a_synthetic_run_reads_no_folder_and_writes_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "cache"))
    cfg = load(*tiny_overrides(tmp_path / "no_data", tmp_path / "run"), "data.loader=synthetic")
    preflight.check_before_work(cfg)
    assert not (tmp_path / "cache").exists()


def test_a_cached_teacher_needs_no_checkpoint_file(tmp_path):
    """A cached teacher never loads its checkpoint (fastreg.cached_teacher compares its name): no file needed."""
    (tmp_path / "features").mkdir()
    cfg = tiny(tmp_path, f"teacher.checkpoint={tmp_path / 'elsewhere.pth'}", f"teacher.cache={tmp_path / 'features'}")
    preflight.check_before_work(cfg)


def test_the_trainer_checks_before_processes_teacher_data_or_index(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        pytest.fail("work started before the check")

    for name in ("setup_distributed", "build_distiller", "build_loader", "open_run_dir"):
        monkeypatch.setattr(fastreg.trainer, name, never)
    cfg = tiny(tmp_path, f"data.val_root={tmp_path / 'vall'}")
    with pytest.raises(FileNotFoundError, match="data.val_root=.*vall does not exist"):
        fastreg.trainer.Trainer(cfg)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- the tools


def test_the_index_names_fastreg_cache_before_the_decode_check(tmp_path, monkeypatch):
    """An unwritable FASTREG_CACHE failed with a PermissionError traceback after the whole decode check."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    cache = blocked_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(fastreg.index, "_check_all", lambda *a: pytest.fail("decode-checked before the cache"))
    with pytest.raises(SystemExit) as exit_:
        fastreg.index.main([str(data), "--no-progress"])
    assert str(exit_.value) == (
        f"error: [Errno 20] FASTREG_CACHE={cache}: the folder {cache / 'index'}, where fastreg keeps the dataset "
        "indexes, is not a writable directory (Not a directory); export FASTREG_CACHE=<a writable folder>, or fix "
        "its permissions"
    )


def test_eval_names_its_cache_folder_before_extracting(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=2)
    torch.save(Student("cnn_tiny").backbone.state_dict(), tmp_path / "tiny.pt")
    cache = blocked_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(
        fastreg.eval.feature_cache, "folder_features", lambda *a, **k: pytest.fail("extracted before the check")
    )
    args = [tmp_path / "tiny.pt", "--arch", "cnn_tiny", "--train-root", data, "--val-root", data, "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        fastreg.eval.main([str(a) for a in args])
    assert str(exit_.value) == (
        f"error: [Errno 20] FASTREG_CACHE={cache}: the folder {cache / 'features'}, where fastreg keeps "
        "fastreg.eval's cached features, is not a writable directory (Not a directory); export "
        "FASTREG_CACHE=<a writable folder>, or fix its permissions"
    )
    given = tmp_path / "file" / "features"
    with pytest.raises(SystemExit) as exit_:
        fastreg.eval.main([str(a) for a in [*args, "--cache-dir", given]])
    assert str(exit_.value) == (
        f"error: [Errno 20] --cache-dir={given}: the folder {given}, where fastreg keeps fastreg.eval's cached "
        "features, is not a writable directory (Not a directory); pass a writable --cache-dir, or fix its "
        "permissions"
    )
