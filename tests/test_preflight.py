"""fastreg.preflight and the cache folders: what a run needs is checked before any work, and the command-line tools
name FASTREG_CACHE before they decode or extract anything. The bad inputs through fastreg.train are in
test_bad_input.py's table; here the parts: the memory estimate, what the check creates, and its place."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from helpers import make_image_folder, tiny_overrides
from hydra import compose, initialize_config_module

import fastreg.eval
import fastreg.eval.feature_cache
import fastreg.index
import fastreg.trainer
from fastreg import preflight
from fastreg.config import TeacherConfig, to_config
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


# ---------------------------------------------------------------------------------------------- teachers


def refusal(cfg) -> str:
    with pytest.raises(ValueError) as error:
        preflight.check_teacher_inputs(cfg)
    return str(error.value)


def test_a_vit_teacher_sees_multiples_of_its_patch_size(tmp_path):
    """timm's patch embedding asserts that the side is a multiple of the patch (its own check, on the meta network
    here), which stopped the first step: refused before the work instead, naming the key and the fix."""
    network = preflight.teacher_network("vit_small_patch14_dinov2")
    with pytest.raises(AssertionError, match="divisible by patch size"):
        network(torch.empty(1, 3, 40, 40, device="meta"))
    network(torch.empty(1, 3, 42, 42, device="meta"))  # a multiple of 14 passes

    dinov2 = ("teacher.arch=vit_small_patch14_dinov2", "data.crop_size=40")
    assert refusal(tiny(tmp_path, *dinov2)) == (
        "teacher.arch=vit_small_patch14_dinov2 cuts its input into 14 x 14 px patches, and data.crop_size=40 is not "
        "a multiple of 14: set teacher.input_size=224 (a multiple of 14: the teacher resizes every image to it), or "
        "data.crop_size to a multiple of 14 (42 is the nearest)"
    )
    preflight.check_teacher_inputs(tiny(tmp_path, *dinov2, "teacher.input_size=224"))  # the fix it names
    preflight.check_teacher_inputs(tiny(tmp_path, "teacher.arch=vit_small_patch14_dinov2", "data.crop_size=42"))
    assert (
        "teacher.input_size=100 is not a multiple of 14: set teacher.input_size=224 or another multiple of 14 "
        "(98 is the nearest)" in refusal(tiny(tmp_path, *dinov2, "teacher.input_size=100"))
    )
    # SEED's small patches go through the teachers too (resized to teacher.input_size, when set)
    seed = ("loss=seed", "data.loader=dali", "data.small_patches=2")
    patches = tiny(tmp_path, "teacher.arch=vit_small_patch16_dinov3", *seed, "data.small_patch_size=20")
    assert "and data.small_patch_size=20 is not a multiple of 16: " in refusal(patches)
    patches = tiny(
        tmp_path, "teacher.arch=vit_small_patch16_dinov3", *seed, "data.small_patch_size=20", "teacher.input_size=32"
    )
    preflight.check_teacher_inputs(patches)
    # two teachers: each named by its key; a conv teacher and a cached one have no patches to fit
    (tmp_path / "features").mkdir()
    teachers = [
        TeacherConfig(arch="vit_base_patch16_dinov3", checkpoint="random"),
        TeacherConfig(arch="cnn_small", checkpoint="random"),
        TeacherConfig(arch="vit_small_patch14_dinov2", checkpoint="random", cache=str(tmp_path / "features")),
    ]
    two = replace(tiny(tmp_path, *dinov2), teacher=None, teachers=teachers)
    assert refusal(two).startswith(
        "teachers.0.arch=vit_base_patch16_dinov3 cuts its input into 16 x 16 px patches, and"
    )
    assert "teachers.1" not in refusal(two) and "teachers.2" not in refusal(two)


VIT_7B_PARAMS = 6_716_030_976  # timm's vit_7b_patch16_dinov3, counted on the meta device
GPU_80GB = (80 * 10**9, "cuda:0 (an 80 GB GPU)")


def test_a_teacher_too_big_for_the_gpu_is_refused_naming_its_cache(tmp_path):
    """The 7B at batch 6144, teacher.input_size=224, the student at 64 px, in a bf16 run on an 80 GB GPU. Its
    forward's lower bound: per image 14^2 patches + the class and 4 register tokens = 201 tokens, each holding the
    residual stream (4096 values) and the SwiGLU's fc1_g and fc1_x outputs (2 x 8192). Its weights in float32 with
    the student's step go over 80 GB; stored in bf16, they fit."""
    assert sum(p.numel() for p in preflight.teacher_network("vit_7b_patch16_dinov3").parameters()) == VIT_7B_PARAMS
    overrides = ["teacher.arch=vit_7b_patch16_dinov3", "teacher.input_size=224", "data.crop_size=64"]
    overrides += ["data.batch_size=6144", "trainer.precision=bf16"]
    cfg = tiny(tmp_path, *overrides, "teacher.dtype=fp32")
    cuda = torch.device("cuda")  # no GPU is touched: the capacity is given
    student = sum(preflight.step_bytes(cfg, cuda))
    batch, tokens = 6144, 14**2 + 5
    fp32 = VIT_7B_PARAMS * 4 + batch * tokens * (4096 * 4 + 2 * 8192 * 2)  # autocast: a float32 residual stream
    bf16 = VIT_7B_PARAMS * 2 + batch * tokens * (4096 * 2 + 2 * 8192 * 2)  # stored in bf16: all of it in bf16
    assert student + bf16 <= GPU_80GB[0] < student + fp32  # 70.8 GB, 94.3 GB
    with pytest.raises(ValueError) as error:
        preflight.check_memory(cfg, cuda, GPU_80GB)
    message = str(error.value)
    assert message.startswith(f"one training step needs at least {preflight.gb(student + fp32)}: ")
    assert "'vit_7b_patch16_dinov3': weights 26.9 GB (6.72B parameters in float32), forward " in message
    assert "more than the 80.0 GB of cuda:0 (an 80 GB GPU)" in message
    assert message.endswith(
        "Lower data.batch_size, store it in bf16 (teacher.dtype=bf16: half its weights), or train without teacher "
        "'vit_7b_patch16_dinov3''s forward: cache its features: python -m fastreg.cache_teacher OUT <same "
        "overrides>, then train with teacher.cache=OUT"
    )
    for dtype in ("bf16", "auto"):  # auto: bf16 for a 1B+ transformer in a bf16 run
        preflight.check_memory(tiny(tmp_path, *overrides, f"teacher.dtype={dtype}"), cuda, GPU_80GB)
    with pytest.raises(ValueError, match="cache_teacher OUT <same overrides>"):  # auto keeps float32 in fp32 runs
        preflight.check_memory(tiny(tmp_path, *overrides[:-1], "teacher.dtype=auto"), cuda, GPU_80GB)
    (tmp_path / "features").mkdir()  # a cached teacher: no weights, no forward
    preflight.check_memory(tiny(tmp_path, *overrides, f"teacher.cache={tmp_path / 'features'}"), cuda, GPU_80GB)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_teachers_forward_is_a_lower_bound_of_what_the_gpu_holds(tmp_path, dtype):
    """The peak the CUDA allocator sees during a DINOv3 ViT-S forward (weights on the device already) is at least
    the estimate of its forward."""
    from fastreg.teachers import build_teacher

    cfg = tiny(
        tmp_path,
        "teacher.arch=vit_small_patch16_dinov3",
        "teacher.input_size=224",
        "data.batch_size=64",
        "trainer.precision=bf16",
        f"teacher.dtype={dtype}",
    )
    [estimate] = preflight.teacher_bytes(cfg)
    teacher = build_teacher(cfg.teachers[0], amp_dtype=torch.bfloat16, device="cuda")
    assert sum(p.numel() * p.element_size() for p in teacher.parameters()) == estimate.weights
    images = torch.randn(64, 3, 224, 224, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    teacher(images)
    torch.cuda.synchronize()
    assert estimate.forward <= torch.cuda.max_memory_allocated() - before


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
