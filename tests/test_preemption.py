"""Preemption and elastic restarts: SIGTERM/SIGUSR1 stop every rank at one step boundary with a checkpoint
and exit code 75, and the same command resumes; torchrun restarts a group that lost a worker, which resumes.

1 process: 32 images, batch 8, 4 steps per epoch. 2 processes: 64 images, 2 ranks x batch 8, 4 steps per epoch.
A fault (tests/fault_runner.py) --at-step N comes just before step N + 1, which still runs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from helpers import assert_equal_states, make_image_folder, tiny_overrides, trained_state
from test_train import compose_cfg

from fastreg import checkpoint as ckpt
from fastreg.preemption import EXIT_PREEMPTED, Preempted
from fastreg.train import train
from fastreg.trainer import Trainer

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
# torch 2.14's torchrun keeps its rendezvous store across restarts, and a restarted group can read the previous
# attempt's gloo addresses from it and fail to connect (README, "Elastic restarts"): a store per attempt.
RESTARTS = ["--max-restarts=1"]
RESTART_ENV = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(data, out), "trainer.epochs=2", *extra]


def cli(data: Path, out: Path, *extra: str) -> list[str]:
    """The overrides of a run through fastreg.train's main (hydra's own directory is the run's)."""
    return [*overrides(data, out, *extra), f"hydra.run.dir={out}"]


@contextmanager
def launched(
    command: list[str], cwd: Path, env: dict | None = None, stdout: int = subprocess.PIPE
) -> Iterator[subprocess.Popen]:
    """The process, its stderr piped. Still running after the block (a failed test; ranks that disagree hang in
    a collective), it gets SIGTERM: torchrun forwards that to its workers, which sit in sessions of their own,
    and SIGKILLs them 30 s later, so that none outlives the test."""
    proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=90)


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    with launched(command, cwd, env) as proc:
        stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def stop_line(out: Path) -> str:
    return next(line for line in (out / "train.log").read_text().splitlines() if " received: stopped at step" in line)


# ---------------------------------------------------------------- one process


def test_sigterm_stops_at_the_next_step_with_a_checkpoint_and_exit_code_75(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = run(
        [sys.executable, str(TESTS / "fault_runner.py"), "--at-step", "5", "--signal", "TERM", "--", *cli(data, out)],
        tmp_path,
    )
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr[-3000:]
    saved = out / "ckpt_epoch0001_step00000006.pt"
    assert (
        f"SIGTERM received: stopped at step 6 (epoch 1.50) and saved {saved}; fastreg.train exits with code 75"
        in stop_line(out)
    )
    state = ckpt.load(saved)
    assert (state["step"], state["batch_in_epoch"]) == (6, 2)

    with caplog.at_level(logging.INFO):
        train(compose_cfg(overrides(data, out)))  # the same command again: trainer.resume=auto
    assert f"resumed from {saved}" in caplog.text
    train(compose_cfg(overrides(data, tmp_path / "straight")))
    assert_equal_states(
        trained_state(tmp_path / "straight" / "ckpt_epoch0002.pt"), trained_state(out / "ckpt_epoch0002.pt")
    )


@pytest.fixture
def guard():
    """Handlers of this test's own for SIGTERM and SIGUSR1, which list the signals that reach them: a signal
    that fit's handlers missed fails the test instead of killing pytest."""
    caught = []

    def handler(signum, frame):
        caught.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield handler, caught
    for sig, old in previous.items():
        signal.signal(sig, old)


def signal_before_step(monkeypatch, step: int, sig: signal.Signals) -> None:
    """This process gets `sig` as step `step` starts; the step still runs."""
    train_step = Trainer.train_step

    def signalled(self, batch):
        if self.step == step - 1:
            os.kill(os.getpid(), sig)
        return train_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled)


def test_stop_handlers_live_in_fit_only_and_a_signal_during_the_save_is_harmless(tmp_path, monkeypatch, guard):
    """SIGUSR1 as step 6 starts, SIGTERM while step 6's checkpoint is written: one stop, one complete file."""
    atomic_save = ckpt.atomic_save

    def save_signalled(obj, path):
        if obj["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        atomic_save(obj, path)

    signal_before_step(monkeypatch, 6, signal.SIGUSR1)
    monkeypatch.setattr(ckpt, "atomic_save", save_signalled)
    with pytest.raises(Preempted, match="SIGUSR1 received: stopped at step 6"):
        train(compose_cfg(overrides(make_image_folder(tmp_path / "data"), tmp_path / "run")))
    handler, caught = guard
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == [handler, handler] and not caught
    assert ckpt.load(tmp_path / "run" / "ckpt_epoch0001_step00000006.pt")["step"] == 6
    assert not list((tmp_path / "run").glob(".*tmp*"))


@pytest.mark.parametrize("step, stops_after", [(4, "ckpt_epoch0001.pt"), (8, None)], ids=["epoch_end", "run_end"])
def test_a_signal_in_an_epochs_last_step_stops_after_the_epochs_own_save(
    tmp_path, monkeypatch, guard, step, stops_after
):
    """In the last step of epoch 1 the stop reuses the epoch's checkpoint; in the run's last step there is
    nothing left to stop, and the run ends as usual."""
    signal_before_step(monkeypatch, step, signal.SIGTERM)
    out = tmp_path / "run"
    with (
        pytest.raises(Preempted, match=f"stopped at step 4 .* and saved {out / stops_after}")
        if stops_after
        else nullcontext()
    ):
        train(compose_cfg(overrides(make_image_folder(tmp_path / "data"), out)))
    assert not list(out.glob("ckpt_*_step*.pt")) and not guard[1]


# ---------------------------------------------------------------- two processes


def test_one_rank_signalled_stops_both_at_the_agreed_step_and_torchrun_resumes(tmp_path):
    """Only rank 1 gets SIGUSR1, before step 5; the ranks agree every 2 steps, so both stop after step 6 and
    exit 75. torchrun (--max-restarts=1) counts that as a failure and restarts them: they resume from step 6."""
    data = make_image_folder(tmp_path / "data", per_class=32)
    out = tmp_path / "run"
    proc = run(
        [
            *TORCHRUN,
            *RESTARTS,
            "--",
            str(TESTS / "fault_runner.py"),
            "--at-step",
            "4",
            "--signal",
            "USR1",
            "--rank",
            "1",
            "--",
            *cli(data, out, "trainer.stop_check_every=2"),
        ],
        tmp_path,
        RESTART_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exitcode: 75)" in proc.stderr
    saved = out / "ckpt_epoch0001_step00000006.pt"
    assert f"SIGUSR1 received: stopped at step 6 (epoch 1.50) and saved {saved}" in stop_line(out)
    assert f"resumed from {saved}" in (out / "train.log").read_text()
    assert torch.load(out / "ckpt_epoch0002.pt", weights_only=True)["step"] == 8


def test_torchrun_forwards_sigusr1_to_its_workers_and_waits(tmp_path):
    """The README's torchrun flags: the agent handles SIGUSR1 (by default it would die of it) and forwards it
    to every worker, which stop, save and exit before --shutdown-timeout; torchrun itself then exits 1."""
    data = make_image_folder(tmp_path / "data")  # 2 steps per epoch, 40 epochs: still training when signalled
    out = tmp_path / "run"
    command = [
        *TORCHRUN,
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=120",
        "-m",
        "fastreg.train",
        *cli(data, out, "trainer.epochs=40", "trainer.stop_check_every=1"),
    ]
    with launched(command, tmp_path, stdout=subprocess.DEVNULL) as proc:  # rank 0's log is in train.log
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "torchrun ended or hung before training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr[-3000:]
    assert "forcefully exiting" not in stderr  # no worker needed a SIGKILL
    step, saved = re.search(r"SIGUSR1 received: stopped at step (\d+) .* and saved (\S+);", stop_line(out)).groups()
    assert int(step) < 80 and ckpt.load(Path(saved))["step"] == int(step)


def test_elastic_restart_after_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed before step 8 on torchrun's first attempt; the restarted group resumes from the
    save at step 6 (trainer.checkpoint_every=2) and finishes."""
    data = make_image_folder(tmp_path / "data", per_class=32)
    out = tmp_path / "run"
    proc = run(
        [
            *TORCHRUN,
            *RESTARTS,
            "--",
            str(TESTS / "elastic_runner.py"),
            "--at-step",
            "7",
            "--rank",
            "1",
            "--",
            *cli(data, out, "trainer.checkpoint_every=2"),
        ],
        tmp_path,
        RESTART_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exitcode: -9)" in proc.stderr
    assert f"resumed from {out / 'ckpt_epoch0001_step00000006.pt'}" in (out / "train.log").read_text()
    assert torch.load(out / "ckpt_epoch0002.pt", weights_only=True)["step"] == 8
