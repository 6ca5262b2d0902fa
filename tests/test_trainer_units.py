"""Pieces of the trainer against closed forms: schedule, optimizers, checkpoints, divergence."""

import logging
import math

import pytest
import torch

from fastreg import checkpoint as ckpt
from fastreg.config import OptimConfig
from fastreg.optim import build_optimizer, epoch_lr, lr_at, lr_scaling_warning

CPU = torch.device("cpu")


def test_lr_warmup_then_cosine():
    peak, warm, total = 0.4, 10, 110
    assert lr_at(0, peak, warm, total, 0.0) == pytest.approx(0.04)
    assert lr_at(9, peak, warm, total, 0.0) == pytest.approx(peak)
    assert lr_at(10, peak, warm, total, 0.0) == pytest.approx(peak)
    assert lr_at(60, peak, warm, total, 0.0) == pytest.approx(peak / 2)
    assert lr_at(35, peak, warm, total, 0.01) == pytest.approx(0.01 + (peak - 0.01) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, peak, warm, total, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_epoch_schedule_is_seeds_adjust_learning_rate():
    # SEED (tools/utils.py adjust_learning_rate, main.py: lr_mult = batch / 256, warmup_epochs = 5), written out
    def seed(epoch, lr, batch, epochs=200, warmup=5):
        mult = batch / 256
        if epoch < warmup:
            return lr + (lr * mult - lr) / warmup * epoch
        return lr * mult * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

    for batch in (256, 1024):
        peak = 0.03 * batch / 256
        for epoch in (0, 1, 4, 5, 6, 100, 199):
            assert epoch_lr(epoch, 0.03, peak, 5, 200) == pytest.approx(seed(epoch, 0.03, batch))
    assert epoch_lr(3, 0.03, 0.03, 5, 200) == pytest.approx(0.03)  # at batch 256 the warmup is flat
    # SimReg (tools.py): 0.05 * 0.5 * (1 + cos(pi * (e - 1) / 130)) for 1-based e, no warmup
    assert epoch_lr(0, 0.05, 0.05, 0, 130) == pytest.approx(0.05)
    assert epoch_lr(65, 0.05, 0.05, 0, 130) == pytest.approx(0.025)
    assert epoch_lr(129, 0.05, 0.05, 0, 130) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 129 / 130)))


def test_lr_scaling_warning_names_the_scaled_lr():
    assert lr_scaling_warning(256, 256, 4, 0.05, 0.05) is None
    assert lr_scaling_warning(None, 512, 2, 0.05, 0.1) is None  # no recipe: nothing to compare with
    message = lr_scaling_warning(256, 512, 2, 0.05, 0.1)
    assert "global batch 512" in message and "256" in message and "0.1 = optim.base_lr 0.05 x 512/256" in message


def test_epoch_schedule_has_no_floor():
    with pytest.raises(ValueError, match="optim.min_lr"):
        OptimConfig(schedule="epoch", min_lr=0.001)
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="step")


@pytest.mark.parametrize(
    "name,impl", [("sgd", "torch.optim.SGD(fused=False)"), ("lars", "timm.optim.Lars"), ("lamb", "timm.optim.Lamb")]
)
def test_optimizers(name, impl):
    p = torch.nn.Parameter(torch.ones(3))
    opt, got = build_optimizer(OptimConfig(name=name), [p], 0.1, CPU)
    assert got == impl
    p.sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("name", ["apex_sgd", "apex_lamb"])
def test_apex_without_nvidia_apex_is_a_clear_error(name):
    with pytest.raises(RuntimeError, match="NVIDIA apex"):
        build_optimizer(OptimConfig(name=name), [torch.nn.Parameter(torch.ones(1))], 0.1, CPU)


def test_atomic_save_prune_and_find_latest(tmp_path):
    for epoch in (1, 2, 3):
        ckpt.atomic_save({"epoch": epoch}, ckpt.checkpoint_path(tmp_path, epoch))
    (tmp_path / ".ckpt_epoch0004.pt.tmp123").write_bytes(b"half a checkpoint")  # a crash mid-save
    ckpt.prune(tmp_path, keep=2, written=ckpt.checkpoint_path(tmp_path, 3))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_epoch0002.pt", "ckpt_epoch0003.pt"]
    latest, state = ckpt.load_resume("auto", tmp_path)
    assert latest.name == "ckpt_epoch0003.pt" and state["epoch"] == 3
    assert ckpt.load_resume("none", tmp_path) is None


def test_saves_inside_an_epoch_sort_between_its_ends_and_never_push_them_out(tmp_path):
    names = [
        "ckpt_epoch0002.pt",
        "ckpt_epoch0001_step00000150.pt",
        "ckpt_epoch0001.pt",
        "ckpt_epoch0000.pt",
        "ckpt_epoch0002_step00000210.pt",
        "ckpt_epoch0001_step00000120.pt",
        "ckpt_epoch0002_step00000240.pt",
        "ckpt_epoch0002_step00000270.pt",
    ]
    for name in names:
        ckpt.atomic_save({}, tmp_path / name)
    assert ckpt.checkpoint_path(tmp_path, 1, 120).name == "ckpt_epoch0001_step00000120.pt"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt_epoch0000.pt",
        "ckpt_epoch0001.pt",
        "ckpt_epoch0001_step00000120.pt",
        "ckpt_epoch0001_step00000150.pt",
        "ckpt_epoch0002.pt",
        "ckpt_epoch0002_step00000210.pt",
        "ckpt_epoch0002_step00000240.pt",
        "ckpt_epoch0002_step00000270.pt",
    ]
    # the 2 newest epoch ends, and the 2 newest saves inside the epoch after them
    ckpt.prune(tmp_path, keep=2, written=tmp_path / "ckpt_epoch0002_step00000270.pt")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt_epoch0001.pt",
        "ckpt_epoch0002.pt",
        "ckpt_epoch0002_step00000240.pt",
        "ckpt_epoch0002_step00000270.pt",
    ]
    assert ckpt.load_resume("auto", tmp_path)[0].name == "ckpt_epoch0002_step00000270.pt"


def test_prune_keeps_the_checkpoint_just_written_and_newer_ones(tmp_path):
    """A folder with newer-numbered checkpoints than the save just written (here another run's epochs 7 and 8):
    keep_checkpoints=1 removes only this run's older save, never the new one (pruned by number, it would go first)
    nor the newer files."""
    for name in ("ckpt_epoch0007.pt", "ckpt_epoch0008.pt", "ckpt_epoch0001.pt", "ckpt_epoch0002.pt"):
        ckpt.atomic_save({"name": name}, tmp_path / name)
    ckpt.prune(tmp_path, keep=1, written=tmp_path / "ckpt_epoch0002.pt")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt_epoch0002.pt",
        "ckpt_epoch0007.pt",
        "ckpt_epoch0008.pt",
    ]


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "ckpt_epoch0001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.UnreadableCheckpoint, match="ckpt_epoch0001.pt"):
        ckpt.load(bad)


def test_resume_refuses_settings_that_change_the_result_unless_forced(tmp_path, caplog):
    saved = {
        "student": {"arch": "resnet18"},
        "teachers": [{"arch": "resnet50"}],
        "trainer": {"epochs": 10, "log_every": 50, "resume_force": False},
    }
    ckpt.compare_configs(saved, {**saved, "trainer": {**saved["trainer"], "log_every": 5}}, tmp_path)  # free
    other = {
        "student": {"arch": "resnet34"},
        "teachers": [{"arch": "resnet50"}, {"arch": "vit_small_patch16"}],
        "trainer": {"epochs": 20, "log_every": 5, "resume_force": False},
    }
    listed = (
        "student.arch 'resnet18' -> 'resnet34'; teachers.1.arch (absent) -> 'vit_small_patch16'; "
        "trainer.epochs 10 -> 20."
    )
    with pytest.raises(ValueError, match="trainer.resume_force=true") as err:
        ckpt.compare_configs(saved, other, tmp_path)
    assert listed in str(err.value) and "log_every" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fastreg.checkpoint"):
        ckpt.compare_configs(saved, {**other, "trainer": {**other["trainer"], "resume_force": True}}, tmp_path)
    assert listed[:-1] in caplog.text


def test_a_checkpoint_older_than_a_setting_resumes_under_the_value_it_was_trained_with(tmp_path):
    saved = {"optim": {"base_lr": 0.05}, "trainer": {"resume_force": False}}  # written before optim.schedule existed
    current = {
        "optim": {"base_lr": 0.05, "schedule": "iteration", "recipe_batch": 256},
        "trainer": {"resume_force": False},
    }
    ckpt.compare_configs(saved, current, tmp_path)
    with pytest.raises(ValueError, match="optim.schedule 'iteration' -> 'epoch'"):
        ckpt.compare_configs(saved, {**current, "optim": {**current["optim"], "schedule": "epoch"}}, tmp_path)


def test_a_checkpoint_from_before_teacher_folding_resumes_only_with_eager_teachers(tmp_path):
    """Checkpoints older than teacher.inference ran their teachers unfolded: 'eager', for one teacher or several."""
    saved = {"teachers": [{"arch": "resnet50"}, {"arch": "resnet101"}], "trainer": {"resume_force": False}}
    current = {
        "teachers": [
            {"arch": "resnet50", "inference": "eager", "compile": False},
            {"arch": "resnet101", "inference": "eager", "compile": False},
        ],
        "trainer": {"resume_force": False, "compile_mode": "default"},
    }
    ckpt.compare_configs(saved, current, tmp_path)
    current["teachers"][1]["inference"] = "folded"
    with pytest.raises(ValueError, match="teachers.1.inference 'eager' -> 'folded'"):
        ckpt.compare_configs(saved, current, tmp_path)
    with pytest.raises(ValueError, match="teacher.inference 'eager' -> 'folded'"):
        ckpt.compare_configs(
            {"teacher": {"arch": "resnet50"}, "trainer": {"resume_force": False}},
            {"teacher": {"arch": "resnet50", "inference": "folded"}, "trainer": {"resume_force": False}},
            tmp_path,
        )


def test_a_checkpoint_from_before_the_teachers_feature_size_and_dtype_resumes_with_their_defaults(tmp_path):
    saved = {"teachers": [{"arch": "vit_small_patch16"}], "trainer": {"resume_force": False}}
    keys = {"feature": "cls", "input_size": None, "dtype": "auto"}
    current = {"teachers": [{"arch": "vit_small_patch16", **keys}], "trainer": {"resume_force": False}}
    ckpt.compare_configs(saved, current, tmp_path)
    for key, value in (("feature", "cls_avgpool"), ("input_size", 224), ("dtype", "bf16")):
        changed = {**current, "teachers": [{**current["teachers"][0], key: value}]}
        with pytest.raises(ValueError, match=f"teachers.0.{key} "):
            ckpt.compare_configs(saved, changed, tmp_path)


def test_a_checkpoint_from_before_the_views_and_the_cache_resumes_with_one_view_and_an_online_teacher(tmp_path):
    saved = {"data": {"augment": "weak"}, "teachers": [{"arch": "resnet50"}], "trainer": {"resume_force": False}}
    views = {
        "teacher_view": "same",
        "teacher_crop": "shared",
        "small_patches": 0,
        "small_patch_size": 96,
        "small_patch_scale": [0.05, 0.14],
    }
    current = {
        "data": {"augment": "weak", **views},
        "teachers": [{"arch": "resnet50", "cache": None}],
        "trainer": {"resume_force": False},
    }
    ckpt.compare_configs(saved, current, tmp_path)
    with pytest.raises(ValueError, match="data.teacher_crop 'shared' -> 'independent'"):
        ckpt.compare_configs(saved, {**current, "data": {**current["data"], "teacher_crop": "independent"}}, tmp_path)
    with pytest.raises(ValueError, match="data.small_patches 0 -> 6"):
        ckpt.compare_configs(saved, {**current, "data": {**current["data"], "small_patches": 6}}, tmp_path)
    with pytest.raises(ValueError, match="teachers.0.cache None -> '/c'"):
        ckpt.compare_configs(saved, {**current, "teachers": [{"arch": "resnet50", "cache": "/c"}]}, tmp_path)


def test_rng_state_round_trip_through_pickle_and_weights_only_load(tmp_path):
    import pickle
    import random

    import numpy as np

    state = pickle.loads(pickle.dumps(ckpt.rng_state()))  # how the ranks gather it
    ckpt.atomic_save(state, tmp_path / "rng.pt")
    a, b, c = torch.rand(3), np.random.rand(3), random.random()
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(a, torch.rand(3)) and np.array_equal(b, np.random.rand(3)) and c == random.random()


def test_log_file_attached_once(tmp_path):
    import logging

    from fastreg.run_log import attach_log_file

    attach_log_file(tmp_path / "train.log")
    attach_log_file(tmp_path / "train.log")
    logging.getLogger("fastreg.test").warning("one line")
    assert (tmp_path / "train.log").read_text().count("one line") == 1


def test_git_commit_of_a_tree_without_git_comes_from_the_environment(monkeypatch):
    """The GPU machine gets a copy of the tree without .git: gpu_check.sh passes the commit in."""
    from fastreg.checkpoint import git_commit

    assert git_commit() != "abc123"
    monkeypatch.setenv("FASTREG_COMMIT", "abc123")
    assert git_commit() == "abc123"
