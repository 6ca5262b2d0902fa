"""End-to-end training on CPU: the real CLI, DDP over gloo, exact resume, one tensor for all models."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BAD,
    ODD_BUT_READABLE,
    add_bad_files,
    add_odd_files,
    assert_equal_states,
    logged_lines,
    make_image_folder,
    run_two_ranks,
    step_losses,
    tiny_overrides,
    trained_state,
)
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fastreg.config import LossConfig, to_config
from fastreg.distiller import build_distiller
from fastreg.pipelines import Batch
from fastreg.placement import Placement
from fastreg.train import train

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_cli_two_epochs_loss_decreases(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=32)
    out = tmp_path / "run"
    args = tiny_overrides(data, out) + ["trainer.epochs=2", f"hydra.run.dir={out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 16  # 64 images / batch 8 = 8 steps per epoch
    assert sum(losses[8:]) < sum(losses[:8])
    state = torch.load(out / "ckpt_epoch0002.pt", weights_only=True)
    assert state["config"]["student"]["arch"] == "cnn_tiny" and state["epoch"] == 2 and state["step"] == 16
    log = (out / "train.log").read_text()
    assert "fastreg commit" in log and "resolved config" in log and "torch.optim.SGD" in log


def test_a_run_on_a_folder_is_named_after_it_logs_every_epoch_and_keeps_the_config_off_the_console(tmp_path):
    """experiment=none with no name= or trainer.out_dir: runs/shapes for data.root=<...>/shapes/train. log_every
    100 and 3 steps per epoch: a loss line at each epoch's end all the same. The console gets a few lines; train.log
    the resolved config in full, the one the checkpoint holds."""
    data = make_image_folder(tmp_path / "shapes" / "train", per_class=12)  # 24 images / batch 8 = 3 steps per epoch
    args = [a for a in tiny_overrides(data, tmp_path) if not a.startswith(("trainer.out_dir=", "trainer.log_every="))]
    args += ["trainer.epochs=2", "trainer.log_every=100"]
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "shapes"
    assert [(m["step"], m["epoch"]) for m in logged_lines(run) if "loss" in m] == [(3, 1.0), (6, 2.0)]
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 15 and not any(line.startswith(("teachers:", "  arch:")) for line in console), console
    assert f"the resolved config is in {run / 'train.log'}" in proc.stdout
    log = (run / "train.log").read_text()
    yaml = log.split("resolved config:\n", 1)[1].split("\n[", 1)[0]
    saved = torch.load(run / "ckpt_epoch0002.pt", weights_only=True)["config"]
    assert OmegaConf.to_container(OmegaConf.create(yaml)) == saved and saved["name"] == "shapes"


def test_epoch_schedule_sets_the_lr_once_per_epoch_and_warns_about_the_batch(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data")  # 32 images / batch 8: 4 steps per epoch
    cfg = compose_cfg(
        tiny_overrides(data, tmp_path / "run")
        + [
            "trainer.epochs=3",
            "optim.schedule=epoch",
            "optim.warmup_epochs=1",
            "optim.base_lr=0.4",
            "optim.recipe_batch=256",
        ]
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    lrs = [m["lr"] for m in logged_lines(tmp_path / "run") if "lr" in m]
    # base 0.4 at batch 256, peak 0.4 x 8/256: warmup epoch 0 stands at base, then cosine over 3 epochs
    peak = 0.4 * 8 / 256
    expected = [0.4] * 4 + [peak * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2) for _ in range(4)]
    assert lrs == pytest.approx(expected)
    assert (
        "differs from the 256 that this recipe reproduces" in caplog.text
        and "0.0125 = optim.base_lr 0.4" in caplog.text
    )


def test_cli_seed_with_small_patches_and_the_teachers_on_the_weak_view(tmp_path):
    """python -m fastreg.train with SEED's small patches and weak/strong views: both queues fill, one pointer."""
    data = make_image_folder(tmp_path / "data", per_class=12)
    out = tmp_path / "run"
    views = ["data.augment=strong", "data.teacher_view=weak", "data.small_patches=3", "data.small_patch_size=16"]
    seed = ["loss=seed", "head=seed", "loss.queue_size=64", "data.loader=dali"]
    args = tiny_overrides(data, out) + seed + views + ["trainer.epochs=2", f"hydra.run.dir={out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in logged_lines(out) if "loss" in m] == list(range(1, 7))  # 24 images, batch 8
    state = torch.load(out / "ckpt_epoch0002.pt", weights_only=True)["loss"]
    assert state["0.ptr"].item() == 6 * 8 % 64  # both queues share the pointer
    # 48 rows of first-patch teacher embeddings: cnn_small's pooled post-ReLU features, so no negative entry, where
    # the initial random rows have some
    small = state["0.small_queue"]
    assert (small[:48] >= 0).all() and (small[48:] < 0).any(dim=1).all()
    assert state["0.queue"].shape == state["0.small_queue"].shape == (64, 128)


def test_small_patches_go_through_student_heads_and_teachers_into_seeds_second_term(tmp_path):
    """data.small_patches: the student (and its head) and the teacher embed the patches, and the loss is SEED's
    CE over the main queue plus CE of the patches over the second queue (main_small-patch.py), written out here
    with python loops (test_losses.seed_reference)."""
    from test_losses import seed_reference

    extra = [
        "loss=seed",
        "head=seed",
        "loss.queue_size=8",
        "loss.tau_t=0.5",
        "data.small_patches=2",
        "data.small_patch_size=16",
    ]
    cfg = to_config(compose_cfg(tiny_overrides(tmp_path, tmp_path) + extra))
    distiller = build_distiller(cfg, Placement.of("fp32", True, torch.device("cpu")))
    loss_fn, teacher = distiller.losses[0], distiller.teachers[0]
    queue, small_queue = loss_fn.queue.clone(), loss_fn.small_queue.clone()
    images, patches = torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)
    distiller.eval()  # BatchNorm's running statistics, so the reference forward below is the same function
    loss, _ = distiller(Batch(images, torch.zeros(4, dtype=torch.long), torch.arange(4), patches=patches))
    with torch.no_grad():
        head, student = distiller.model.heads[0], distiller.student
        s, s_p = head(student(images)), head(student(patches))
        t, t_p = teacher(images), teacher(patches)
    expected = seed_reference(s.tolist(), t.tolist(), queue.tolist(), 0.2, 0.5)
    expected += seed_reference(s_p.tolist(), t_p.tolist(), small_queue.tolist(), 0.2, 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_teachers_and_student_see_the_same_tensor(tmp_path):
    cfg = to_config(
        compose_cfg(
            tiny_overrides(tmp_path, tmp_path)
            + ["teachers=[{arch: cnn_small, checkpoint: random}, {arch: cnn_small, checkpoint: random}]"]
        )
    )
    distiller = build_distiller(
        cfg, Placement.of(cfg.trainer.precision, cfg.trainer.channels_last, torch.device("cpu"))
    )
    seen = []
    for module in [distiller.student, *distiller.teachers]:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss, metrics = distiller(Batch(images, torch.zeros(4, dtype=torch.long), torch.arange(4)))
    assert len(seen) == 3 and all(x is images for x in seen)  # the student once for both heads
    assert set(metrics) == {"loss/cnn_small_0", "cos/cnn_small_0", "loss/cnn_small_1", "cos/cnn_small_1"}
    w = distiller.weights
    assert torch.allclose(loss, w[0] * metrics["loss/cnn_small_0"] + w[1] * metrics["loss/cnn_small_1"])


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_resume_gives_identical_weights(tmp_path, loader):
    """DALI's shuffle advances once per pass: the resumed run gets epoch 3's order only from the loader
    state in the checkpoint (without it, it would replay epoch 1's)."""
    data = make_image_folder(tmp_path / "data")
    extra = ["trainer.epochs=4", "trainer.keep_checkpoints=10", "loss.center_teacher=true", f"data.loader={loader}"]
    train(compose_cfg(tiny_overrides(data, tmp_path / "straight") + extra))
    # A run killed after epoch 2: only its epoch-2 checkpoint survives; the same command resumes it.
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt_epoch0002.pt", tmp_path / "resumed")
    train(compose_cfg(tiny_overrides(data, tmp_path / "resumed") + extra + ["trainer.resume=auto"]))
    assert_equal_states(
        trained_state(tmp_path / "straight" / "ckpt_epoch0004.pt"),
        trained_state(tmp_path / "resumed" / "ckpt_epoch0004.pt"),
    )
    data_state = torch.load(tmp_path / "resumed" / "ckpt_epoch0004.pt", weights_only=True)["data"]
    assert [s["loader"] for s in data_state] == ["dali-cpu" if loader == "dali" else "torchvision"]


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_resume_inside_an_epoch_continues_with_the_same_samples(tmp_path, loader):
    """32 images, batch 8: 4 steps per epoch, a save every 3 steps. The run resumed from step 6 (inside the
    second epoch) trains steps 7 and 8 on the samples the straight run saw: same losses, same weights."""
    data = make_image_folder(tmp_path / "data")
    extra = ["trainer.epochs=2", "trainer.keep_checkpoints=0", "trainer.checkpoint_every=3", f"data.loader={loader}"]
    train(compose_cfg(tiny_overrides(data, tmp_path / "straight") + extra))
    inside = tmp_path / "straight" / "ckpt_epoch0001_step00000006.pt"
    assert sorted(p.name for p in (tmp_path / "straight").glob("ckpt_*.pt")) == [
        "ckpt_epoch0000_step00000003.pt",
        "ckpt_epoch0001.pt",
        "ckpt_epoch0001_step00000006.pt",
        "ckpt_epoch0002.pt",
    ]
    (tmp_path / "resumed").mkdir()
    shutil.copy(inside, tmp_path / "resumed")
    train(compose_cfg(tiny_overrides(data, tmp_path / "resumed") + extra))
    straight, resumed = step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed")
    assert sorted(resumed) == [7, 8] and all(resumed[k] == straight[k] for k in resumed)
    assert_equal_states(
        trained_state(tmp_path / "straight" / "ckpt_epoch0002.pt"),
        trained_state(tmp_path / "resumed" / "ckpt_epoch0002.pt"),
    )

    # Another batch size (forced: it changes the result): no loader can continue after batch 2 of 8-image
    # batches; from an epoch's end it can.
    other = ["data.batch_size=4", "trainer.resume_force=true"]
    (tmp_path / "other").mkdir()
    shutil.copy(inside, tmp_path / "other")
    with pytest.raises(ValueError, match="cannot continue there"):
        train(compose_cfg(tiny_overrides(data, tmp_path / "other") + extra + other))
    (tmp_path / "other" / inside.name).unlink()
    shutil.copy(tmp_path / "straight" / "ckpt_epoch0001.pt", tmp_path / "other")
    train(compose_cfg(tiny_overrides(data, tmp_path / "other") + extra + other))
    assert sorted(step_losses(tmp_path / "other")) == list(range(5, 13))  # 8 steps of 4 images after step 4


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from hydra import compose, initialize_config_module
from fastreg.config import to_config
from fastreg.trainer import Trainer
with initialize_config_module("fastreg.configs", version_base="1.3"):
    cfg = to_config(compose("config", overrides=sys.argv[1:]))
trainer = Trainer(cfg)
trainer.fit()
params = torch.cat([p.detach().flatten() for p in trainer.distiller.model.parameters()])
gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, params)
if dist.get_rank() == 0:
    print("MAXDIFF", max((g - gathered[0]).abs().max().item() for g in gathered))
    print("STEPS", trainer.step)
    print("IMPLS", [type(h).__name__ for h in trainer.distiller.model.heads],
          [type(loss).__name__ == "FusedRegressionLoss" for loss in trainer.distiller.losses])
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
"""


@pytest.mark.parametrize(
    "overrides, env",
    [
        (["loss=seed", "head=seed", "loss.queue_size=32"], {}),
        # the patches go through the student in the same DDP forward; both queues take every rank's keys
        (
            [
                "loss=seed",
                "head=seed",
                "loss.queue_size=32",
                "data.loader=dali",
                "data.small_patches=2",
                "data.small_patch_size=16",
            ],
            {},
        ),
        # DDP's gradient hooks fire on the gradients of fastreg.kernels' autograd Functions too
        (["loss.impl=triton", "head.impl=triton", "head=mlp2_bn"], {"TRITON_INTERPRET": "1"}),
    ],
    ids=["seed", "seed_small_patches", "triton_head_and_loss"],
)
def test_ddp_two_processes_gloo(tmp_path, overrides, env):
    data = make_image_folder(tmp_path / "data", per_class=16)
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    args = tiny_overrides(data, tmp_path / "run") + ["trainer.epochs=2", *overrides]
    proc = run_two_ranks(script, args, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MAXDIFF 0.0" in proc.stdout
    assert "STEPS 4" in proc.stdout  # 32 images, 2 ranks x batch 8 -> 2 steps per epoch
    assert (tmp_path / "run" / "ckpt_epoch0002.pt").exists()
    assert ("IMPLS ['FusedMLPHead'] [True]" in proc.stdout) == bool(env)


def test_ddp_resume_inside_an_epoch_restores_each_ranks_dali_shard(tmp_path):
    """Two ranks, each with its own DALI reader state: resumed from step 6 (inside the second epoch), both
    continue on their own shard's samples, so losses and weights equal the straight run's."""
    data = make_image_folder(tmp_path / "data", per_class=32)  # 64 images, 2 ranks x batch 8: 4 steps/epoch
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    extra = ["trainer.epochs=2", "trainer.keep_checkpoints=0", "trainer.checkpoint_every=3", "data.loader=dali"]

    def torchrun(out: Path):
        proc = run_two_ranks(script, [*tiny_overrides(data, out), *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(tmp_path / "straight")
    inside = tmp_path / "straight" / "ckpt_epoch0001_step00000006.pt"
    assert len(torch.load(inside, weights_only=True)["data"]) == 2  # one reader state per rank
    (tmp_path / "resumed").mkdir()
    shutil.copy(inside, tmp_path / "resumed")
    torchrun(tmp_path / "resumed")
    straight, resumed = step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed")
    assert sorted(resumed) == [7, 8] and all(resumed[k] == straight[k] for k in resumed)
    assert_equal_states(
        trained_state(tmp_path / "straight" / "ckpt_epoch0002.pt"),
        trained_state(tmp_path / "resumed" / "ckpt_epoch0002.pt"),
    )


def test_divergence_stops_before_writing_a_checkpoint(tmp_path):
    """lr 1e12: the first step's weights overflow every later loss; each bad step is skipped, and the
    epoch-end save (step 4) finds max_bad_steps=2 consecutive ones and stops instead."""
    data = make_image_folder(tmp_path / "data")
    overrides = tiny_overrides(data, tmp_path / "run") + [
        "loss=mse",
        "optim.base_lr=1e12",
        "trainer.log_every=100",
        "trainer.max_bad_steps=2",
    ]
    with pytest.raises(FloatingPointError, match="NaN or inf in trainer.max_bad_steps=2 consecutive steps from step 2"):
        train(compose_cfg(overrides))
    assert not list((tmp_path / "run").glob("ckpt_*.pt"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_knn_at_the_end(tmp_path, precision):
    data = make_image_folder(tmp_path / "data")
    overrides = tiny_overrides(data, tmp_path / "run") + [
        f"trainer.precision={precision}",
        f"data.val_root={data}",
        "trainer.deterministic=false",
        "trainer.epochs=1",
    ]
    results = train(compose_cfg(overrides))
    assert set(results) == {"knn20_majority", "knn20_weighted", "nn1"} and 0 <= results["knn20_weighted"] <= 100
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"eval/knn20_majority"' in lines


def test_torch_compile_trains_and_saves_plain_keys(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="fastreg"):
        train(
            compose_cfg(
                tiny_overrides(data, tmp_path / "run")
                + ["trainer.compile=true", "trainer.epochs=1", "trainer.deterministic=false"]
            )
        )
    state = torch.load(tmp_path / "run" / "ckpt_epoch0001.pt", weights_only=True)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state["student"])
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert re.search(r"torch.compile: \d+ graphs, 0 graph breaks", caplog.text)


@pytest.mark.parametrize(
    "student, head, loss",
    [
        ("cnn_tiny", "linear", LossConfig(center_teacher=True)),  # the demo's step
        ("resnet18", "simreg4", LossConfig()),
        ("resnet18", "simreg4", LossConfig(name="seed", queue_size=16)),
    ],
)
def test_compiled_step_has_no_graph_break(student, head, loss):
    """What trainer.compile compiles, the trained part (student and heads) and the losses, each one graph:
    torch._dynamo.explain counts the graphs and breaks of a real call (no backend needed)."""
    from fastreg.config import HeadConfig, TeacherConfig
    from fastreg.distiller import Distiller
    from fastreg.heads import build_head
    from fastreg.losses import build_loss
    from fastreg.students import Student
    from fastreg.teachers import build_teacher

    teacher, s = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random")), Student(student)
    distiller = Distiller(
        [teacher],
        s,
        [build_head(HeadConfig(kind=head), s.dim, teacher.dim)],
        [build_loss(loss, teacher.dim, torch.device("cpu"))],
        [1.0],
    )
    images = torch.randn(4, 3, 32, 32)
    preds, targets = distiller.model(images)[0], [teacher(images)]
    for fn, args in ((distiller.model, (images,)), (distiller.weighted_losses, (preds, targets))):
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_bad_images_are_left_out_and_the_dali_run_completes(tmp_path, caplog):
    """Corrupt, truncated and zero-byte files among 32 JPEGs, a CMYK JPEG and a PNG named .jpg: any of the bad
    ones would kill the DALI pipeline; the index leaves them out, warns, keeps the readable odd ones, and
    training runs to the end over 34 images."""
    data = make_image_folder(tmp_path / "data", per_class=16)
    add_bad_files(data)
    add_odd_files(data)
    out = tmp_path / "run"
    overrides = tiny_overrides(data, out) + [
        "data.loader=dali",
        "data.max_bad_fraction=0.2",
        "trainer.epochs=2",
        f"data.val_root={data}",
    ]  # k-NN reads the same folder
    with caplog.at_level(logging.INFO):
        train(compose_cfg(overrides))
    log = (out / "train.log").read_text()
    total = 32 + len(ODD_BUT_READABLE) + len(BAD)
    assert f"left out {len(BAD)} of {total} images" in log and "loader dali-cpu (4 batches/epoch)" in log
    assert torch.load(out / "ckpt_epoch0002.pt", weights_only=True)["step"] == 8
    assert "epoch 2 k-NN" in log


def test_too_many_bad_images_stop_before_training(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=16)
    add_bad_files(data)  # 3 of 35 = 8.6%, over the default 1%
    with pytest.raises(ValueError, match="data.max_bad_fraction=0.01"):
        train(compose_cfg(tiny_overrides(data, tmp_path / "run") + ["data.loader=dali"]))


def test_an_index_error_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 decode-checks the data while the others wait: its error must reach them, not leave them hanging."""
    data = make_image_folder(tmp_path / "data", per_class=16)
    add_bad_files(data)  # 3 of 35 bad, over the default 1%
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    proc = run_two_ranks(script, [*tiny_overrides(data, tmp_path / "run"), "data.loader=dali"], timeout=120)
    assert proc.returncode != 0
    assert "more than data.max_bad_fraction=0.01" in proc.stderr
    assert "rank 0 could not index" in proc.stderr  # rank 1's own message
