"""NaN and inf losses, injected into a loss module at chosen steps: the step is undone on the device (weights,
buffers and optimizer state bitwise as before it), counted, logged, and a long run of them stops training."""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder, run_two_ranks, tiny_overrides
from hydra import compose, initialize_config_module
from test_train import DDP_SCRIPT

import fastreg.trainer as trainer_module
from fastreg.config import TrainerConfig, to_config
from fastreg.nonfinite import StepSkip, StepUndo
from fastreg.trainer import Trainer

TWO_TEACHERS = "teachers=[{arch: cnn_small, checkpoint: random}, {arch: cnn_small, checkpoint: random}]"

TESTS = Path(__file__).resolve().parent


def poison(trainer: Trainer, steps, corrupt=lambda loss: loss * float("nan"), index: int = 0) -> None:
    """Teacher `index`'s loss becomes corrupt(loss) at the training steps in `steps` (1-based); NaN by default,
    which makes its gradients NaN too."""
    loss_module = trainer.distiller.losses[index]
    forward, calls = loss_module.forward, itertools.count(1)

    def bad_forward(s, t):
        loss, cos = forward(s, t)
        return (corrupt(loss) if next(calls) in steps else loss), cos

    loss_module.forward = bad_forward


def make_trainer(tmp_path, *extra: str) -> Trainer:
    """32 images, batch 8: 4 steps per epoch."""
    data = make_image_folder(tmp_path / "data")
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(data, tmp_path / "run") + ["trainer.epochs=1", *extra])
    return Trainer(to_config(cfg))


def snapshot(trainer: Trainer) -> dict[str, dict]:
    """Copies of the parameters, the buffers (BatchNorm's running statistics) and the optimizer's tensor state."""
    model = trainer.distiller.model
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "optim": {
            f"{i}.{k}": v.clone()
            for i, s in trainer.optimizer.state_dict()["state"].items()
            for k, v in s.items()
            if torch.is_tensor(v)
        },
    }


def record_steps(trainer: Trainer) -> tuple[list[dict], list[dict]]:
    """The snapshots before and after every train_step, in step order."""
    before, after, train_step = [], [], trainer.train_step

    def recorded(batch):
        before.append(snapshot(trainer))
        out = train_step(batch)
        after.append(snapshot(trainer))
        return out

    trainer.train_step = recorded
    return before, after


def equal(a: dict, b: dict) -> bool:
    """Bitwise, through nested dicts."""
    return a.keys() == b.keys() and all(
        equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a
    )


def metrics(trainer: Trainer) -> dict[int, dict]:
    lines = (trainer.out_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}


@pytest.mark.parametrize("optim", ["sgd", "lars", "lamb"])
def test_a_bad_step_leaves_weights_and_optimizer_state_as_before(tmp_path, caplog, optim):
    """Steps 1 and 3 are bad. Step 3 leaves every parameter, BatchNorm statistic and optimizer tensor bitwise
    as before it; step 1, which creates the optimizer state, leaves that state at zeros."""
    trainer = make_trainer(tmp_path, f"optim={optim}", "optim.base_lr=0.1")
    poison(trainer, {1, 3})
    before, after = record_steps(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert trainer.step == 4
    assert equal(before[2], after[2]) and not equal(before[1]["params"], after[1]["params"])
    assert not equal(before[1]["buffers"], after[1]["buffers"])  # the forward moved them: step 3 put them back
    assert equal(before[0]["params"], after[0]["params"]) and equal(before[0]["buffers"], after[0]["buffers"])
    created = after[0]["optim"].values()
    assert created and all(not v.any() for v in created)
    assert all(v.isfinite().all() for part in after[3].values() for v in part.values() if v.is_floating_point())
    assert {step: m["skipped_steps"] for step, m in metrics(trainer).items()} == {1: 1, 2: 0, 3: 1, 4: 0}
    assert "1 step(s) up to step 3 had a NaN or inf loss and were skipped" in caplog.text


def test_max_bad_steps_in_a_row_stop_and_name_the_step_and_each_teachers_loss(tmp_path):
    """Two teachers, the second one's loss NaN from step 3 on, max_bad_steps=3, a save every step. The saves
    during the bad steps (below the limit) hold the weights of step 2; the one at step 5 is never written."""
    trainer = make_trainer(
        tmp_path,
        TWO_TEACHERS,
        "trainer.epochs=2",
        "trainer.max_bad_steps=3",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=0",
        "trainer.log_every=100",
    )
    poison(trainer, range(3, 100), index=1)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    message = str(err.value)
    assert "NaN or inf in trainer.max_bad_steps=3 consecutive steps from step 3 (epoch 1)" in message
    assert re.search(r"at step 3: loss nan, loss/cnn_small_0 \d\.\d+, loss/cnn_small_1 nan\.", message)
    assert f"the last checkpoint in {trainer.out_dir} is intact" in message
    names = sorted(p.name for p in trainer.out_dir.glob("ckpt_*.pt"))
    assert names == [
        "ckpt_epoch0000_step00000001.pt",
        "ckpt_epoch0000_step00000002.pt",
        "ckpt_epoch0000_step00000003.pt",
        "ckpt_epoch0001.pt",
    ]
    saved = {name: torch.load(trainer.out_dir / name, weights_only=True) for name in names}
    for name in names[2:]:  # written after the bad steps 3 and 4: the weights from before them
        for part in ("student", "heads"):
            assert equal(saved[name][part], saved[names[1]][part]), (name, part)


def test_a_run_of_bad_steps_is_not_forgotten_when_good_steps_follow(tmp_path):
    """Steps 5-7 bad, step 8 good again, the only check at step 8 (the epoch's end): it still stops."""
    trainer = make_trainer(tmp_path, "trainer.epochs=2", "trainer.max_bad_steps=3", "trainer.log_every=100")
    poison(trainer, {5, 6, 7}, corrupt=lambda loss: loss * float("inf"))
    with pytest.raises(FloatingPointError, match="consecutive steps from step 5 .epoch 2.; at step 5: loss inf"):
        trainer.fit()
    assert sorted(p.name for p in trainer.out_dir.glob("ckpt_*.pt")) == ["ckpt_epoch0001.pt"]


class OverflowingGradient(torch.autograd.Function):
    """Identity forward, inf gradient: a finite loss whose fp16 gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_fp16_gradient_overflow_is_the_scalers_and_a_nan_loss_still_counts(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.precision=fp16", "trainer.deterministic=false")
    poison(trainer, {3})
    poison(trainer, {2}, corrupt=OverflowingGradient.apply)
    before, after = record_steps(trainer)
    scale = trainer.scaler.get_scale()
    trainer.fit()
    logged = metrics(trainer)
    assert all(torch.isfinite(torch.tensor(logged[2][k])) for k in ("loss", "loss/cnn_small"))
    assert {step: m["skipped_steps"] for step, m in logged.items()} == {1: 0, 2: 0, 3: 1, 4: 0}
    assert trainer.scaler.get_scale() == scale / 4  # halved by the overflow at step 2 and the NaN at step 3
    assert equal(before[1]["params"], after[1]["params"])  # the scaler skipped the optimizer step


def test_no_host_sync_in_a_training_step(tmp_path, monkeypatch):
    """A host sync needs a device value on the host: item, tolist, bool, float, int or numpy of a tensor.
    None of them runs inside train_step (logging steps read the metrics outside it)."""
    trainer = make_trainer(tmp_path, "trainer.log_every=2")
    poison(trainer, {2})
    inside, reads, train_step = [False], [], trainer.train_step

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0]:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def step(batch):
        inside[0] = True
        try:
            return train_step(batch)
        finally:
            inside[0] = False

    trainer.train_step = step
    trainer.fit()
    assert trainer.step == 4 and metrics(trainer)[2]["skipped_steps"] == 1
    assert reads == []


# test_train's 2-rank script, with rank 1's loss NaN at step 2
DDP_SCRIPT = DDP_SCRIPT.replace(
    "trainer = Trainer(cfg)\n",
    f"""trainer = Trainer(cfg)
sys.path.insert(0, {str(TESTS)!r})
from test_nonfinite import poison
if dist.get_rank() == 1:
    poison(trainer, {{2}})
""",
)


def test_ddp_one_ranks_nan_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's loss is NaN at step 2: DDP's averaged gradients are NaN on both ranks, and both undo the step."""
    data = make_image_folder(tmp_path / "data")
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    proc = run_two_ranks(script, [*tiny_overrides(data, out), "trainer.epochs=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MAXDIFF 0.0" in proc.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in lines if "loss" in m] == [0, 1, 0, 0]  # rank 0's own loss was finite
    assert torch.isfinite(torch.tensor([m["loss"] for m in lines if "loss" in m])).all()


def test_max_bad_steps_is_at_least_one():
    with pytest.raises(ValueError, match="trainer.max_bad_steps must be >= 1"):
        TrainerConfig(max_bad_steps=0)


# ---- StepSkip: the fused optimizer's kernel skips a bad step (found_inf), with no copy of the weights ----


@pytest.fixture
def fused_sgd(monkeypatch):
    """optim=sgd built as on CUDA: torch's fused SGD, whose CPU kernel takes found_inf too. The guard is then
    StepSkip; building a StepUndo (a copy of the weights every step) fails the test."""
    build = trainer_module.build_optimizer
    monkeypatch.setattr(
        trainer_module, "build_optimizer", lambda cfg, params, lr, device: build(cfg, params, lr, torch.device("cuda"))
    )

    def copies_the_weights(*args):
        raise AssertionError("StepUndo built on the found_inf path")

    monkeypatch.setattr(StepUndo, "__init__", copies_the_weights)


@pytest.fixture
def uninitialized_is_nan(monkeypatch):
    """torch.empty_like's memory holds anything (fused SGD's first-step momentum comes from it): NaN shows it."""
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: torch.full_like(x, float("nan"), **kw))


def detached_nan(loss: torch.Tensor) -> torch.Tensor:
    """A NaN loss with finite gradients: only the loss check can skip the step."""
    return loss + (loss * float("nan")).detach()


def test_found_inf_skips_a_bad_step_bitwise_with_a_copy_of_the_buffers_only(
    tmp_path, caplog, fused_sgd, uninitialized_is_nan
):
    """Step 1 (it creates the momentum) and step 3 bad, step 3's gradients finite: as StepUndo, every parameter,
    momentum buffer and BatchNorm statistic bitwise as before step 3, and zeros in the state step 1 created."""
    trainer = make_trainer(tmp_path, "optim.base_lr=0.1")
    assert isinstance(trainer.guard, StepSkip) and trainer.optimizer.found_inf is trainer.guard.bad
    poison(trainer, {1})
    poison(trainer, {3}, corrupt=detached_nan)
    before, after = record_steps(trainer)
    with caplog.at_level(logging.INFO):
        trainer.fit()
    assert equal(before[2], after[2]) and not equal(before[1]["params"], after[1]["params"])
    assert not equal(before[1]["buffers"], after[1]["buffers"])
    assert before[2]["optim"] and not equal(before[2]["optim"], before[1]["optim"])  # momentum is in the snapshots
    assert equal(before[0]["params"], after[0]["params"]) and equal(before[0]["buffers"], after[0]["buffers"])
    created = after[0]["optim"].values()
    assert created and all(not v.any() for v in created)
    assert all(v.isfinite().all() for part in after[3].values() for v in part.values() if v.is_floating_point())
    assert {step: m["skipped_steps"] for step, m in metrics(trainer).items()} == {1: 1, 2: 0, 3: 1, 4: 0}
    buffers = sum(b.numel() for b in trainer.distiller.model.buffers())
    assert sum(t.numel() for t in trainer.guard.buffers.backup.values()) == buffers  # no parameter copied
    assert "a step whose loss is NaN or inf is skipped inside the fused optimizer kernel (found_inf)" in caplog.text


@pytest.mark.parametrize("bad", [1, 2])
@pytest.mark.parametrize("guard", ["StepSkip", "StepUndo"])
def test_the_steps_after_a_bad_one_are_those_of_a_run_without_its_batch(tmp_path, request, guard, bad):
    """Step `bad` NaN, against a run that leaves that batch out (same lr schedule, same following batches):
    after step 4 the weights, BatchNorm statistics and momentum are bitwise the same."""
    if guard == "StepSkip":
        request.getfixturevalue("fused_sgd")
    runs = []
    for name in ("nan", "left_out"):
        trainer = make_trainer(tmp_path / name, "optim.base_lr=0.1", "trainer.log_every=100")
        assert type(trainer.guard).__name__ == guard
        if name == "nan":
            poison(trainer, {bad})
        else:
            train_step = trainer.train_step

            def leave_out(batch, trainer=trainer, train_step=train_step):
                if trainer.step + 1 != bad:
                    return train_step(batch)
                trainer.step += 1
                return torch.zeros(()), {}, 0.0

            trainer.train_step = leave_out
        trainer.fit()
        runs.append(snapshot(trainer))
    assert equal(*runs)


def test_fp16_the_loss_check_is_folded_into_the_scalers_found_inf(tmp_path, fused_sgd, uninitialized_is_nan):
    """GradScaler's found_inf (the gradients) with the loss check added. Step 1's fp16 gradients overflow:
    the scaler skips it, not counted, and the momentum it created is zeros. Step 3's loss is NaN with finite
    gradients: skipped and counted, though the scaler saw nothing (its scale does not drop)."""
    trainer = make_trainer(tmp_path, "trainer.precision=fp16", "trainer.deterministic=false")
    assert isinstance(trainer.guard, StepSkip) and not hasattr(trainer.optimizer, "found_inf")
    poison(trainer, {1}, corrupt=OverflowingGradient.apply)
    poison(trainer, {3}, corrupt=detached_nan)
    before, after = record_steps(trainer)
    scale = trainer.scaler.get_scale()
    trainer.fit()
    assert {step: m["skipped_steps"] for step, m in metrics(trainer).items()} == {1: 0, 2: 0, 3: 1, 4: 0}
    assert trainer.scaler.get_scale() == scale / 2  # the overflow at step 1 only
    assert equal(before[0]["params"], after[0]["params"])
    created = after[0]["optim"].values()
    assert created and all(not v.any() for v in created)
    assert equal(before[2], after[2]) and not equal(before[1]["params"], after[1]["params"])


def test_found_inf_passes_the_undo_guards_tests(tmp_path, caplog, monkeypatch, fused_sgd, uninitialized_is_nan):
    """StepSkip passes StepUndo's tests above: the same bad steps, limits, counts and messages, no host sync."""
    test_a_bad_step_leaves_weights_and_optimizer_state_as_before(tmp_path / "a", caplog, "sgd")
    test_max_bad_steps_in_a_row_stop_and_name_the_step_and_each_teachers_loss(tmp_path / "b")
    test_a_run_of_bad_steps_is_not_forgotten_when_good_steps_follow(tmp_path / "c")
    test_fp16_gradient_overflow_is_the_scalers_and_a_nan_loss_still_counts(tmp_path / "d")
    test_no_host_sync_in_a_training_step(tmp_path / "e", monkeypatch)


def test_ddp_found_inf_skips_the_step_on_every_rank(tmp_path, monkeypatch):
    """Rank 1's loss is NaN at step 2, with torch's fused SGD on both ranks: both skip it."""
    build_fused = (
        "import torch, fastreg.trainer as t\nbuild = t.build_optimizer\n"
        "t.build_optimizer = lambda cfg, p, lr, device: build(cfg, p, lr, torch.device('cuda'))\n"
    )
    script = DDP_SCRIPT.replace(
        "trainer = Trainer(cfg)\n",
        build_fused + "trainer = Trainer(cfg)\nassert type(trainer.guard).__name__ == 'StepSkip'\n",
        1,
    )
    monkeypatch.setattr(sys.modules[__name__], "DDP_SCRIPT", script)
    test_ddp_one_ranks_nan_skips_the_step_on_every_rank(tmp_path)


def test_optimizers_without_found_inf_keep_step_undo(tmp_path, caplog):
    trainer = make_trainer(tmp_path, "optim=lars")
    assert isinstance(trainer.guard, StepUndo)
    with caplog.at_level(logging.INFO):
        trainer.log_startup()
    assert "a step whose loss is NaN or inf is undone from a copy of the weights" in caplog.text
