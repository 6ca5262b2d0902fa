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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_equal_states,
    launched,
    logged_lines,
    make_image_folder,
    signal_when,
    tiny_overrides,
    trained_state,
)
from PIL import Image
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
# The README's flags: the agent forwards SIGUSR1 (by default it would die of it) and waits for its workers.
TORCHRUN_FORWARDING = [
    *TORCHRUN,
    "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "--shutdown-timeout=120",
    "-m",
    "fastreg.train",
]
RESTART_ENV = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(data, out), "trainer.epochs=2", *extra]


def cli(data: Path, out: Path, *extra: str) -> list[str]:
    """The overrides of a run through fastreg.train's main (hydra's own directory is the run's)."""
    return [*overrides(data, out, *extra), f"hydra.run.dir={out}"]


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


# ---------------------------------------------------------------- outside the training loop


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> bytes:
    """A 2400x2400 JPEG (200 kB): its decode check takes about 25 ms, where a test image's takes well under 1."""
    y, x = np.mgrid[0:2400, 0:2400]
    pixels = np.stack([(x // 3) % 256, (y // 5) % 256, ((x + y) // 7) % 256], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    Image.fromarray(pixels).save(path, quality=85)
    return path.read_bytes()


def add_large_images(folder: Path, jpeg: bytes, count: int = 200) -> None:
    """`count` large JPEGs in class0: indexing the folder (a decode check of every image) takes seconds."""
    for i in range(count):
        (folder / "class0" / f"large{i}.jpg").write_bytes(jpeg)


def logged(out: Path, text: str) -> bool:
    return (out / "train.log").is_file() and text in (out / "train.log").read_text()


def temporary_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if ".tmp" in p.name]


def stop_message(stderr: str) -> str:
    """The stop's line, the last one on stderr and the only one that names a signal (the index's progress bar
    may come before it)."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and [line for line in lines if " received " in line] == lines[-1:], stderr
    print(lines[-1])  # pytest -s shows them: docs/reliability.md quotes them
    return lines[-1]


UNDER_FOREIGN_CODE = """
import atexit, sys, time
from pathlib import Path
from fastreg.preemption import AtOnce, cleaned_up

atexit.register(print, "an atexit hook ran", file=sys.stderr)  # as torch's FakeTensor statistics do, at INFO
with AtOnce("the program", lambda: "nothing was saved"):
    partial = Path("partial")
    partial.touch()
    with cleaned_up(lambda: partial.unlink(missing_ok=True)):
        print("ready", flush=True)
        try:  # third-party code that takes any exception for its own, as an import or OmegaConf did
            time.sleep(60)
        except BaseException:
            pass
print("went on")
"""


def test_a_stop_signal_at_once_ends_the_process_whatever_code_it_interrupts(tmp_path):
    """A stop at once raised an exception where the signal found the process: inside an import cut short, the
    next access to numpy.linalg failed with a RecursionError; inside OmegaConf it became an AttributeError; torch's
    atexit hooks printed after the line; exit 1 either way. Now the handler ends the process itself, after the
    cleanups of the blocks it is in, so code that catches BaseException neither keeps it nor goes on."""
    command = [sys.executable, "-c", UNDER_FOREIGN_CODE]
    with launched(command, tmp_path, None, stdout=subprocess.PIPE) as proc:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stdout) == (EXIT_PREEMPTED, "")
    assert (
        stderr
        == "SIGTERM received during start-up: stopped at once; nothing was saved; the program exits with code 75 (EX_TEMPFAIL)\n"
    )
    assert not (tmp_path / "partial").exists()


IN_A_FORKED_WORKER = """
import multiprocessing, os, signal, time
from pathlib import Path
from fastreg.preemption import AtOnce, cleaned_up

with AtOnce("the program", lambda: "nothing was saved"):
    partial = Path("partial")
    partial.touch()
    with cleaned_up(lambda: partial.unlink(missing_ok=True)):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))  # as a DataLoader's
        worker.start()
        time.sleep(0.5)
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(30)
        print(worker.exitcode, partial.exists())
"""


def test_a_forked_worker_stopped_at_once_leaves_the_parents_files_and_says_nothing(tmp_path):
    """A DataLoader worker forked during start-up or the final evaluation inherited the handler and the cleanups: a
    stop signal to it removed the parent's partial file (or lock) and printed the parent's line once per worker."""
    command = [sys.executable, "-c", IN_A_FORKED_WORKER]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{EXIT_PREEMPTED} True\n", "")


@pytest.mark.parametrize(
    "sig, when",
    [("TERM", "imports"), ("USR1", "index"), ("TERM", "index_after_a_preemption")],
)
def test_a_signal_during_start_up_exits_75_with_one_line_saying_what_the_same_command_does(
    tmp_path, monkeypatch, guard, large_jpeg, sig, when
):
    """A signal while python imports torch, or while the index decode-checks 200 large images (the folder changed
    since the last index), stops at once with code 75: it once ended the process with 143 or 138 and no word,
    which Slurm does not requeue. The line says the same command starts over, or, after an earlier stop at a step
    boundary, resumes from its checkpoint, left as it was; the index is not half-written."""
    data = make_image_folder(tmp_path / "data")
    out, cache = tmp_path / "run", tmp_path / "cache"
    saved = None
    if when == "index_after_a_preemption":  # the run was stopped after step 6, and requeued
        signal_before_step(monkeypatch, 6, signal.SIGTERM)
        with pytest.raises(Preempted):
            train(compose_cfg(overrides(data, out)))
        saved = out / "ckpt_epoch0001_step00000006.pt"
    before = saved.read_bytes() if saved else None
    add_large_images(data, large_jpeg)
    start = time.monotonic()

    def ready() -> bool:
        if when == "imports":
            return time.monotonic() > start + 1
        return logged(out, "loss simreg: eager PyTorch")  # the teacher and the heads are built; the index is next

    proc = signal_when(
        [sys.executable, "-m", "fastreg.train", *cli(data, out)],
        tmp_path,
        {**os.environ, "FASTREG_CACHE": str(cache)},
        signal.Signals[f"SIG{sig}"],
        ready,
    )
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr[-3000:]
    line = stop_message(proc.stderr)
    assert line.startswith(f"SIG{sig} received during start-up: stopped at once; ")
    assert line.endswith("; fastreg.train exits with code 75 (EX_TEMPFAIL)")
    if saved:
        assert f"; {saved} is saved: the same command resumes from it;" in line
        assert saved.read_bytes() == before
    else:
        assert "the same command starts over" in line and not list(out.glob("*.pt"))
    if when != "imports":
        assert line in (out / "train.log").read_text()
        assert not list(cache.glob("index/*/index.json"))  # stopped inside the index, which was not published
    assert not temporary_files(out, cache)


def test_a_signal_during_the_final_evaluation_exits_75_and_keeps_the_checkpoint(tmp_path, large_jpeg):
    """The k-NN of the final evaluation indexes and reads a validation folder of 200 large images: a signal there
    stops it at once, after the last save. It once waited for the evaluation (longer than Slurm's grace period
    on a large dataset) and then exited 0."""
    data, val = make_image_folder(tmp_path / "data"), make_image_folder(tmp_path / "val", per_class=2)
    add_large_images(val, large_jpeg)
    out = tmp_path / "run"
    saved = out / "ckpt_epoch0001.pt"
    proc = signal_when(
        [sys.executable, "-m", "fastreg.train", *cli(data, out, "trainer.epochs=1", f"data.val_root={val}")],
        tmp_path,
        {**os.environ, "FASTREG_CACHE": str(tmp_path / "cache")},
        signal.SIGTERM,
        lambda: logged(out, f"saved {saved}"),
    )
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr[-3000:]
    assert stop_message(proc.stderr) == (
        f"SIGTERM received during the final evaluation: stopped at once; training is complete and saved in {saved}, "
        "the evaluation is not: the same command resumes there and runs it; fastreg.train exits with code 75 "
        "(EX_TEMPFAIL)"
    )
    assert ckpt.load(saved)["step"] == 4
    assert not [m for m in logged_lines(out) if "eval/nn1" in m]
    assert not temporary_files(out, tmp_path / "cache")


def test_fastreg_demo_handles_a_signal_while_it_builds_its_data(tmp_path):
    """python -m fastreg.demo goes through fastreg.train's main from its first line: a signal while it renders
    its dataset ends it with code 75, and the unfinished build is removed."""
    cache = tmp_path / "cache"
    proc = signal_when(
        [sys.executable, "-m", "fastreg.demo"],
        tmp_path,
        {**os.environ, "FASTREG_CACHE": str(cache)},
        signal.SIGTERM,
        lambda: any((cache / "demo").glob(".digits*.tmp-*/train/*/*.jpg")),
    )
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr[-3000:]
    assert stop_message(proc.stderr) == (
        "SIGTERM received during start-up: stopped at once; the same command starts over (trainer.resume=none); "
        "fastreg.train exits with code 75 (EX_TEMPFAIL)"
    )
    assert not list((cache / "demo").iterdir()) and not list((tmp_path / "runs" / "demo").iterdir())


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
        *TORCHRUN_FORWARDING,
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


def test_torchrun_workers_each_stop_at_once_when_signalled_during_start_up(tmp_path, large_jpeg):
    """Slurm signals every task, and torchrun (the README's flags) forwards the signal to every worker: during
    start-up, with rank 0 decode-checking 200 large images and rank 1 waiting for its index, each worker stops on
    its own signal with its own line, nothing saved."""
    data = make_image_folder(tmp_path / "data", per_class=32)
    add_large_images(data, large_jpeg)
    out = tmp_path / "run"
    command = [
        *TORCHRUN_FORWARDING,
        *cli(data, out),
    ]
    proc = signal_when(
        command,
        tmp_path,
        {**os.environ, "FASTREG_CACHE": str(tmp_path / "cache")},
        signal.SIGUSR1,
        lambda: logged(out, "loss simreg: eager PyTorch"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own code after a signal (README)
    line = (
        "SIGUSR1 received during start-up: stopped at once; nothing was saved yet: the same command starts over; "
        "fastreg.train exits with code 75 (EX_TEMPFAIL)"
    )
    assert proc.stderr.count(line) == 2 and "forcefully exiting" not in proc.stderr, proc.stderr[-3000:]
    assert not list(out.glob("*.pt")) and not temporary_files(out, tmp_path / "cache")


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
