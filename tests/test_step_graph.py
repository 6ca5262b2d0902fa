"""trainer.cuda_graph (fastreg.step_graph): the settings a captured step cannot have are refused by name, the lr
travels in device tensors without changing the training, and on a GPU the replayed steps are the eager steps,
a NaN batch included."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_image_folder, tiny_overrides
from hydra import compose, initialize_config_module
from test_nonfinite import equal, fused_sgd, make_trainer, metrics, snapshot  # noqa: F401 (fused_sgd: a fixture)

from fastreg.config import to_config
from fastreg.pipelines import Batch
from fastreg.step_graph import WARMUP, StepGraph, lr_tensors
from fastreg.trainer import Trainer


def compose_cfg(tmp_path, *extra: str):
    data = make_image_folder(tmp_path / "data")
    overrides = [o for o in tiny_overrides(data, tmp_path / "run") if not o.startswith("trainer.device=")]
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return to_config(compose("config", overrides=[*overrides, *extra]))


@pytest.mark.parametrize(
    "extra, says",
    [
        (["trainer.precision=fp16"], "trainer.cuda_graph=true cannot capture fp16's GradScaler"),
        (["trainer.compile_mode=reduce-overhead"], "trainer.compile_mode=reduce-overhead captures CUDA graphs"),
        (["optim=lars"], "trainer.cuda_graph=true needs optim=sgd"),
    ],
)
def test_settings_a_graph_cannot_capture_are_refused(tmp_path, extra, says):
    with pytest.raises(ValueError, match=says):
        compose_cfg(tmp_path, "trainer.device=cuda", "trainer.cuda_graph=true", *extra)


def test_a_cpu_run_is_refused_before_any_work(tmp_path):
    cfg = compose_cfg(tmp_path, "trainer.device=cpu", "trainer.cuda_graph=true")
    with pytest.raises(ValueError, match="trainer.cuda_graph=true needs a CUDA device, and this run is on cpu"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fused", [False, True])
def test_lr_in_device_tensors_trains_as_floats_and_checkpoints_floats(tmp_path, request, fused):
    """The trainer fills the lr tensors the graph reads: 4 steps bitwise the same as with float lrs (plain and
    fused SGD), and the checkpoint holds floats, so it resumes with or without the graph."""
    if fused:
        request.getfixturevalue("fused_sgd")
    runs = []
    for name in ("float", "tensor"):
        trainer = make_trainer(tmp_path / name, "optim.base_lr=0.1", "optim.warmup_epochs=0.5")
        if name == "tensor":
            lr_tensors(trainer.optimizer, trainer.device)
        trainer.fit()
        runs.append(trainer)
    assert equal(snapshot(runs[0]), snapshot(runs[1]))
    lrs = [m["lr"] for m in metrics(runs[1]).values()]
    assert len(set(lrs)) > 1 and runs[1].optimizer.param_groups[0]["lr"].item() == pytest.approx(lrs[-1])
    saved = torch.load(runs[1].out_dir / "ckpt_epoch0001.pt", weights_only=True)
    assert all(type(g["lr"]) is float for g in saved["optimizer"]["param_groups"])
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lrs[-1])


# ---- on a GPU ----


def graph_trainer(tmp_path, graph: bool, precision: str, *extra: str) -> Trainer:
    """On CUDA, fused SGD: 32 images, batch 8, 2 epochs = 8 steps, WARMUP eager, then captured and replayed."""
    return Trainer(
        compose_cfg(
            tmp_path,
            "trainer.device=cuda",
            f"trainer.cuda_graph={str(graph).lower()}",
            f"trainer.precision={precision}",
            "trainer.epochs=2",
            "optim.base_lr=0.1",
            *extra,
        )
    )


# SEED with small patches and the teachers on the weak view: every Batch field copied into the graph's inputs, both
# queues' enqueue captured
VIEWS = ("loss=seed", "head=seed", "loss.queue_size=64", "data.augment=strong", "data.teacher_view=weak",
         "data.small_patches=2", "data.small_patch_size=16")  # fmt: skip


def nan_at(trainer: Trainer, step: int) -> None:
    """The batch of training step `step` (1-based) is NaN: a replayed graph runs no Python to poison a loss."""
    train_step = trainer.train_step

    def step_with_nan(batch):
        poisoned = dataclasses.replace(batch, images=batch.images * float("nan"))
        return train_step(poisoned if trainer.step + 1 == step else batch)

    trainer.train_step = step_with_nan


@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision, tol, extra",
    [("fp32", 1e-5, ()), ("bf16", 2e-2, ()), ("fp32", 1e-5, VIEWS)],
    ids=["fp32", "bf16", "views"],
)
def test_replayed_steps_are_the_eager_steps_with_a_nan_batch_skipped(tmp_path, precision, tol, extra):
    runs = []
    for graph in (False, True):
        trainer = graph_trainer(tmp_path / str(graph), graph, precision, *extra)
        nan_at(trainer, WARMUP + 3)  # replayed, after the capture
        trainer.fit()
        runs.append(trainer)
    eager, graphed = runs
    assert isinstance(graphed.run_update, StepGraph) and graphed.run_update.graph is not None
    assert graphed.step == eager.step == 8
    skipped = {step: m["skipped_steps"] for step, m in metrics(graphed).items()}
    assert skipped == {step: m["skipped_steps"] for step, m in metrics(eager).items()}
    assert skipped[WARMUP + 3] == 1 and sum(skipped.values()) == 1
    a, b = snapshot(eager), snapshot(graphed)
    assert a.keys() == b.keys()
    for part in a:
        for key in a[part]:
            torch.testing.assert_close(b[part][key], a[part][key], rtol=tol, atol=tol, msg=f"{part} {key}")


@pytest.mark.gpu
def test_a_batch_of_another_shape_is_refused_after_the_capture(tmp_path):
    trainer = graph_trainer(tmp_path, True, "bf16")
    images = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.zeros(8, dtype=torch.long, device="cuda")
    for _ in range(WARMUP + 1):
        trainer.train_step(Batch(images, labels, labels))
    with pytest.raises(ValueError, match=r"captured the step for batches whose images is \(8, 3, 32, 32\)"):
        trainer.train_step(Batch(images[:4], labels[:4], labels[:4]))
