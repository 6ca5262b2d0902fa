"""The trainer's parts on their own: the checkpointer over Stateful parts, the NaN guard, the divergence check,
the stop agreement, the run logger, the placement and the lr schedule."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from fastreg import checkpoint as ckpt
from fastreg.checkpointer import Checkpointer, Entry, Progress, Resumed, check_data_position, find, rank_state
from fastreg.config import OptimConfig
from fastreg.nonfinite import Divergence, StepSkip, StepUndo, build_guard
from fastreg.optim import LrSchedule, lr_at
from fastreg.placement import Placement
from fastreg.preemption import StopAgreement, StopSignals, cleaned_up
from fastreg.run_log import RunLogger, attach_log_file

CPU = torch.device("cpu")


def sgd_with_state() -> torch.optim.SGD:
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.full((3,), 0.5)
    opt.step()  # creates the momentum buffer
    return opt


def make_checkpointer(tmp_path, progress: Progress, opt: torch.optim.Optimizer, data: dict, *more) -> Checkpointer:
    return Checkpointer(
        tmp_path,
        [Entry("optimizer", opt.state_dict, opt.load_state_dict), progress, *more],
        {"data": lambda: data, "rng": ckpt.rng_state},
        {"config": {"a": 1}, "commit": "c0ffee"},
        rank=0,
        world=1,
        keep=2,
    )


def test_a_save_holds_every_part_under_todays_keys_and_restores_them(tmp_path):
    opt = sgd_with_state()
    path = make_checkpointer(tmp_path, Progress(2, 9, 1), opt, {"position": 5}).save(tmp_path / "ckpt_epoch0002.pt")
    state = torch.load(path, weights_only=True)
    assert state.keys() == {"optimizer", "epoch", "step", "batch_in_epoch", "data", "rng", "config", "commit"}
    assert (state["epoch"], state["step"], state["batch_in_epoch"], state["data"]) == (2, 9, 1, [{"position": 5}])

    expected = torch.rand(4)  # the generator after the save; the restore puts it back to the saved state
    fresh_opt, progress = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=1.0, momentum=0.9), Progress()
    make_checkpointer(tmp_path, progress, fresh_opt, {}).restore(Resumed(path, state))
    assert progress == Progress(2, 9, 1)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"], torch.full((3,), 0.5))
    assert fresh_opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(torch.rand(4), expected)


def test_older_checkpoints_without_a_batch_position_resume_at_an_epochs_end():
    progress = Progress(5, 5, 5)
    progress.load_state({"epoch": 3, "step": 12}, "old.pt")
    assert progress == Progress(3, 12, 0)


def test_saves_are_pruned_to_the_newest(tmp_path):
    saver = make_checkpointer(tmp_path, Progress(), sgd_with_state(), {})
    for epoch in range(1, 5):
        saver.save(ckpt.checkpoint_path(tmp_path, epoch))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_epoch0003.pt", "ckpt_epoch0004.pt"]


def trained_parts() -> list[Entry]:
    """The entries of a trainer checkpoint that the parts above leave out (the distiller's, the scaler's)."""
    return [Entry(key, dict, lambda state: None) for key in ("student", "heads", "loss", "scaler")]


def test_find_refuses_a_checkpoint_of_other_settings(tmp_path):
    saver = make_checkpointer(tmp_path, Progress(), sgd_with_state(), {}, *trained_parts())
    saver.save(ckpt.checkpoint_path(tmp_path, 1))
    assert find("auto", tmp_path, {"a": 1}).state["commit"] == "c0ffee"
    assert find("none", tmp_path, {"a": 1}) is None
    with pytest.raises(ValueError, match="a 1 -> 2"):
        find("auto", tmp_path, {"a": 2})


def test_per_rank_state_of_another_world_size_starts_afresh_with_a_warning(tmp_path, caplog):
    resumed = Resumed(tmp_path / "x.pt", {"data": [{"r": 0}, {"r": 1}]})
    assert rank_state(resumed, "data", 1, 2) == {"r": 1}
    with caplog.at_level(logging.WARNING):
        assert rank_state(resumed, "data", 0, 3) is None
    assert "holds the data of 2 process(es), this run has 3" in caplog.text
    assert rank_state(None, "data", 0, 1) is None


class Loader:
    name, position = "dali-cpu", (1, 4)


def test_a_resume_inside_an_epoch_needs_the_loader_there(tmp_path):
    resumed = Resumed(tmp_path / "ckpt_epoch0001_step00000007.pt", {})
    check_data_position(resumed, Progress(1, 7, 4), Loader())  # where the loader is: fine
    check_data_position(resumed, Progress(1, 7, 0), Loader())  # an epoch's end: the loader starts the epoch anyway
    with pytest.raises(ValueError, match="saved inside epoch 2, after batch 3, and this run's dali-cpu loader"):
        check_data_position(resumed, Progress(1, 6, 3), Loader())


# ---- divergence ----


def record(divergence: Divergence, losses: list[float], first_step: int = 1) -> None:
    for step, value in enumerate(losses, first_step):
        loss = torch.tensor(value)
        divergence.record(divergence.loss_is_finite(loss), step, {"loss": loss, "loss/t": loss * 2})


def test_divergence_counts_skipped_steps_and_stops_a_long_run_of_them(tmp_path, caplog):
    divergence = Divergence(["loss/t"], limit=3, world=1, device=CPU, batches=4, out_dir=tmp_path)
    record(divergence, [1.0, float("nan"), 2.0, float("inf")])
    with caplog.at_level(logging.WARNING):
        assert divergence.skipped_since_log(4, warn=True) == 2
    assert "2 step(s) up to step 4 had a NaN or inf loss and were skipped" in caplog.text
    assert divergence.skipped_since_log(4, warn=True) == 0 and divergence.check() == 2
    record(divergence, [float("nan")] * 2, first_step=5)  # with step 4: three in a row
    with pytest.raises(
        FloatingPointError,
        match=r"3 consecutive steps from step 4 \(epoch 1\); at step 4: loss inf, "
        r"loss/t inf.*last checkpoint in .* is intact",
    ):
        divergence.check()


# ---- stop agreement ----


def test_a_stop_signal_is_agreed_at_the_next_check_and_named():
    stop = StopAgreement(world=1, device=CPU, every=20)  # one process checks every step, whatever `every` says
    with stop.signals:
        assert not stop.due(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.due(2) and stop.signal == signal.SIGUSR1
    message = stop.message(2, 0.5, "run/ckpt.pt", "run")
    assert message.startswith("SIGUSR1 received: stopped at step 2 (epoch 0.50) and saved run/ckpt.pt")
    assert "exits with code 75" in message


class Exited(Exception):
    """os._exit(code), as the `exits` fixture makes it: the test goes on."""


@pytest.fixture
def exits(monkeypatch):
    def exit_(code: int):
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", exit_)


def test_in_the_final_evaluation_a_stop_signal_ends_the_process_at_once_even_one_received_before(
    exits, capfd, caplog, tmp_path
):
    """After the last save nothing waits for a step boundary: a signal inside at_once ends the process there, after
    the cleanups of the blocks it is in, and one recorded in the last steps ends it as the evaluation starts; the
    handlers come back either way."""
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    partial = tmp_path / "partial"
    partial.touch()
    with pytest.raises(Exited) as inside, StopSignals() as signals, signals.at_once("the final evaluation", "saved"):
        with cleaned_up(lambda: partial.unlink(missing_ok=True)):  # stop_now's call; here the block ends too
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler ends the process before this ends
    assert inside.value.args == (75,) and not partial.exists()
    assert caplog.messages[-1].startswith("SIGTERM received during the final evaluation")  # train.log's copy
    assert capfd.readouterr().err == (
        "SIGTERM received during the final evaluation: stopped at once; saved; fastreg.train exits with code 75 "
        "(EX_TEMPFAIL)\n"
    )
    with pytest.raises(Exited), StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded: a step boundary would come
        with signals.at_once("the final evaluation", "saved"):
            pytest.fail("the evaluation ran")
    assert capfd.readouterr().err.startswith("SIGUSR1 received before the final evaluation: stopped at once; saved;")
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == before


# ---- run logger ----


@pytest.fixture
def train_log(tmp_path):
    """tmp_path/train.log attached to the root logger, as fastreg.run_log.open_run_dir leaves it; removed after."""
    handler = attach_log_file(tmp_path / "train.log")
    yield tmp_path / "train.log"
    logging.getLogger().removeHandler(handler)
    handler.close()


def test_the_run_logger_writes_steps_and_evaluations_and_logs_the_config(tmp_path, caplog, train_log):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 3, "loss": 9}\n')  # a killed run's
    run_log = RunLogger(tmp_path, is_main=True, start_step=2, device=CPU, monitor=False, progress=False)
    config = {"trainer": {"epochs": 3, "seed": 0}, "student": {"arch": "cnn_tiny"}}
    with caplog.at_level(logging.INFO), run_log:
        run_log.startup(config, "abc123", ["device cpu"])
        task = run_log.epoch_task(0, 3, 4, 0)
        run_log.step(3, {"loss": 0.5, "lr": 0.1, "img_per_s": 10.0}, task)
        run_log.evaluation(4, 1, {"nn1": 50.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 9},
        {"step": 3, "loss": 0.5, "lr": 0.1, "img_per_s": 10.0},
        {"step": 4, "eval/nn1": 50.0},
    ]
    # the console (the root logger's handlers, as caplog's): what runs and where the config is, not the config
    assert (
        f"fastreg commit abc123; the resolved config is in {train_log}" in caplog.text and "device cpu" in caplog.text
    )
    assert "epochs" not in caplog.text and "cnn_tiny" not in caplog.text
    assert 'epoch 1 k-NN: {"nn1": 50.0}' in caplog.text
    # train.log: the config in full, as YAML that reads back to it
    written = train_log.read_text()
    assert "fastreg commit abc123, resolved config:" in written and "device cpu" in written
    yaml = written.split("resolved config:\n", 1)[1].split("\n[", 1)[0]
    assert OmegaConf.to_container(OmegaConf.create(yaml)) == config


def test_other_ranks_write_nothing(tmp_path):
    run_log = RunLogger(tmp_path, is_main=False, start_step=0, device=CPU, monitor=True, progress=True)
    with run_log:
        run_log.step(1, {"loss": 0.5, "lr": 0.1, "img_per_s": 10.0}, run_log.epoch_task(0, 1, 1, 0))
    assert run_log.monitor is None and not (tmp_path / "metrics.jsonl").exists()


# ---- placement and schedule ----


@pytest.mark.parametrize(
    "precision, amp, scaler", [("bf16", torch.bfloat16, False), ("fp16", torch.float16, True), ("fp32", None, False)]
)
def test_placement_is_decided_once_from_the_precision(precision, amp, scaler):
    place = Placement.of(precision, True, CPU)
    assert (place.amp_dtype, place.scaler, place.half_images) == (amp, scaler, amp is not None)
    assert place.memory_format == torch.channels_last
    assert Placement.of(precision, False, CPU).memory_format == torch.contiguous_format


def test_the_schedule_sets_float_and_tensor_lrs_alike():
    schedule = LrSchedule(OptimConfig(base_lr=0.2, warmup_epochs=1), epochs=3, batches_per_epoch=4, global_batch=512)
    assert schedule.peak == pytest.approx(0.4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    tensor_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(1.0))
    for step in range(12):
        lr = schedule.apply(opt, step)
        assert schedule.apply(tensor_opt, step) == lr == lr_at(step, 0.4, 4, 12, 0.0)
        assert opt.param_groups[0]["lr"] == lr and tensor_opt.param_groups[0]["lr"].item() == pytest.approx(lr)


# ---- the NaN guard, without a trainer ----


def guarded_step(fused: bool, ok: bool) -> tuple[dict, dict]:
    """One SGD step of Linear-BatchNorm through the guard that build_guard picks: (state before, state after)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, fused=fused)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()  # the momentum exists: the guarded step must leave it as it is
    opt.zero_grad()
    guard = build_guard(dict(model.named_buffers()), opt, torch.amp.GradScaler("cpu", enabled=False))
    assert isinstance(guard, StepSkip if fused else StepUndo)

    def state() -> dict:
        return {k: v.clone() for k, v in [*model.state_dict().items(), *opt.state_dict()["state"][0].items()]}

    before = state()
    guard.save()
    model(torch.randn(8, 4)).square().mean().backward()  # moves BatchNorm's running statistics too
    flag = torch.tensor(ok)
    guard.skip_unless(flag)
    opt.step()
    guard.undo_unless(flag)
    return before, state()


@pytest.mark.parametrize("fused", [True, False])
def test_the_guard_leaves_a_bad_step_bitwise_undone_and_a_good_one_done(fused):
    before, after = guarded_step(fused, ok=False)
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = guarded_step(fused, ok=True)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert {"0.weight", "1.running_mean", "momentum_buffer"} <= set(changed)
