"""Killed processes resume exactly, and a kill during a save loses nothing.

Every run is tests/fault_runner.py in a process of its own; a killed run is resumed by the same command
(trainer.resume=auto) in a new one. 32 images, batch 8: 4 steps per epoch, 3 epochs, a save every 3 steps,
so checkpoints at steps 3, 4 (epoch 1's end), 6, 8 (epoch 2's end), 9 and 12. Every step draws from the
global torch, numpy and python generators (--random-ops), as dropout or host-side augmentation would.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_equal_states, logged_lines, make_image_folder, tiny_overrides, trained_state

from fastreg import cache_teacher
from fastreg import checkpoint as ckpt
from fastreg.run_log import drop_lines_after

RUNNER = Path(__file__).with_name("fault_runner.py")
SCHEDULE = ["trainer.epochs=3", "trainer.checkpoint_every=3", "trainer.keep_checkpoints=0"]
VARIANTS = {
    "torchvision": ["data.loader=torchvision"],
    "dali": ["data.loader=dali"],  # dali-cpu without a GPU
    # SEED's queue (32 entries, 8 per step: its pointer is mid-cycle at step 6) and fp16's GradScaler,
    # whose growth tracker counts the steps since the last overflow
    "seed_fp16": ["data.loader=torchvision", "loss=seed", "head=seed", "loss.queue_size=32", "trainer.precision=fp16"],
    # SEED's small patches and second queue, with the teachers on the weak view of the student's strong one: every
    # view from DALI's checkpointed pipeline
    "views": [
        "data.loader=dali",
        "loss=seed",
        "head=seed",
        "loss.queue_size=32",
        "data.augment=strong",
        "data.teacher_view=weak",
        "data.small_patches=2",
        "data.small_patch_size=16",
    ],
    # a DINOv3 ViT-S (random: built from the trainer's seed in each process) seeing the crops resized to 48 px
    "dinov3": ["data.loader=torchvision", "teacher.arch=vit_small_patch16_dinov3", "teacher.input_size=48"],
    # the teacher's rows looked up by dataset position (the data fixture writes the cache beside the images)
    "cached": ["data.loader=dali", "teacher.cache={data}.teacher_cache"],
}


def run(data: Path, out: Path, variant: str, *fault: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    variant_overrides = [o.format(data=data) for o in VARIANTS[variant]]
    overrides = [*tiny_overrides(data, out), *SCHEDULE, *variant_overrides, *extra, f"hydra.run.dir={out}"]
    return subprocess.run(
        [sys.executable, str(RUNNER), "--random-ops", *fault, "--", *overrides],
        capture_output=True,
        text=True,
        cwd=out.parent,
        timeout=300,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    images = make_image_folder(tmp_path_factory.mktemp("data") / "images")
    cache = f"{images}.teacher_cache"
    cache_teacher.main([cache, *tiny_overrides(images, images.parent / "cache_run"), "data.loader=torchvision"])
    return images


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run of a variant, once per module."""
    runs: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in runs:
            out = tmp_path_factory.mktemp("straight") / variant
            proc = run(data, out, variant)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[variant] = out
        return runs[variant]

    return get


def without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "img_per_s"} for m in lines]


def assert_same_as_straight(resumed: Path, straight: Path) -> None:
    """Every step logged once, with the straight run's losses; the same final weights, queue, optimizer, scaler."""
    lines = without_timing(logged_lines(resumed))
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert tensorboard_steps(resumed) == list(range(1, 13))  # the killed run's later points purged
    assert lines == without_timing(logged_lines(straight))
    assert_equal_states(trained_state(straight / "ckpt_epoch0003.pt"), trained_state(resumed / "ckpt_epoch0003.pt"))


@pytest.mark.parametrize(
    "variant, killed_at, resumes_from",
    [
        ("torchvision", 7, "ckpt_epoch0001_step00000006.pt"),  # inside epoch 2, a step past its save
        ("torchvision", 8, "ckpt_epoch0002.pt"),  # right after epoch 2's save
        ("dali", 7, "ckpt_epoch0001_step00000006.pt"),
        ("dali", 8, "ckpt_epoch0002.pt"),
        ("seed_fp16", 7, "ckpt_epoch0001_step00000006.pt"),
        ("views", 7, "ckpt_epoch0001_step00000006.pt"),
        ("cached", 7, "ckpt_epoch0001_step00000006.pt"),
        ("dinov3", 4, "ckpt_epoch0001.pt"),  # killed right after epoch 1's save
    ],
)
def test_a_killed_run_resumes_exactly(data, straight, tmp_path, variant, killed_at, resumes_from):
    out = tmp_path / "run"
    killed = run(data, out, variant, "--at-step", str(killed_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [m["step"] for m in logged_lines(out)] == list(range(1, killed_at + 1))

    resumed = run(data, out, variant)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"resumed from {out / resumes_from}" in log
    assert_same_as_straight(out, straight(variant))


@pytest.mark.parametrize("point", ["half", "before_rename"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(data, straight, tmp_path, point):
    """keep_checkpoints=1: the previous save survives the one killed while it was written; the killed
    save's temporary file is removed at the next start and never resumed from."""
    out = tmp_path / "run"
    keep_one = ("trainer.keep_checkpoints=1",)
    killed = run(data, out, "torchvision", "--in-save", f"ckpt_epoch0002.pt:{point}", extra=keep_one)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt_epoch0001.pt", "ckpt_epoch0001_step00000006.pt"]
    [partial] = out.glob(".ckpt_epoch0002.pt.tmp*")
    assert zipfile_complete(partial) == (point == "before_rename")  # the kill came where it was meant to

    resumed = run(data, out, "torchvision", extra=keep_one)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"removing {partial}" in log and f"resumed from {out / 'ckpt_epoch0001_step00000006.pt'}" in log
    assert not list(out.glob(".ckpt_*"))
    assert_same_as_straight(out, straight("torchvision"))


def tensorboard_steps(run: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars("loss")]


def zipfile_complete(path: Path) -> bool:
    if not zipfile.is_zipfile(path):  # half a file has no central directory
        return False
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() is None


def test_auto_resume_skips_a_corrupt_checkpoint_with_its_final_name(data, straight, tmp_path):
    """A copy gone wrong: the newest checkpoint is cut short. auto warns and resumes from the one before it;
    named in trainer.resume, it is an error."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt_epoch0001.pt", "ckpt_epoch0001_step00000006.pt"):
        (out / name).write_bytes((straight("torchvision") / name).read_bytes())
    truncate(out / "ckpt_epoch0001_step00000006.pt")
    named = run(data, out, "torchvision", extra=(f"trainer.resume={out / 'ckpt_epoch0001_step00000006.pt'}",))
    assert named.returncode == 1
    assert f"error: checkpoint {out / 'ckpt_epoch0001_step00000006.pt'} cannot be read" in named.stderr
    resumed = run(data, out, "torchvision")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"checkpoint {out / 'ckpt_epoch0001_step00000006.pt'} cannot be read" in log
    assert "trainer.resume=auto skips it" in log and f"resumed from {out / 'ckpt_epoch0001.pt'}" in log
    assert_equal_states(
        trained_state(straight("torchvision") / "ckpt_epoch0003.pt"), trained_state(out / "ckpt_epoch0003.pt")
    )


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": truncate,
    "cut_to_its_first_byte": lambda p: p.write_bytes(p.read_bytes()[:1]),  # "P": not to be called a text file
    "flipped_byte": flip_a_byte,
    "empty": lambda p: p.write_bytes(b""),
    "not_a_checkpoint": lambda p: p.write_text("not a checkpoint"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_unreadable_checkpoints_are_skipped_by_auto_and_an_error_by_name(tmp_path, corrupt):
    """A flipped byte inside a tensor loads without complaint in torch.load: the zip's CRC-32s catch it."""
    for epoch in (1, 2):
        ckpt.atomic_save({"epoch": epoch, "w": torch.arange(4096.0)}, ckpt.checkpoint_path(tmp_path, epoch))
    newest = ckpt.checkpoint_path(tmp_path, 2)
    CORRUPTIONS[corrupt](newest)
    path, state = ckpt.load_resume("auto", tmp_path)
    assert path.name == "ckpt_epoch0001.pt" and state["epoch"] == 1
    with pytest.raises(ckpt.UnreadableCheckpoint, match=f"checkpoint {newest} cannot be read") as e:
        ckpt.load_resume(str(newest), tmp_path)  # named by the user: no fallback
    if corrupt.startswith(("truncated", "cut")):
        assert "the file is damaged, cut short or of another kind" in str(e.value)
    CORRUPTIONS[corrupt](ckpt.checkpoint_path(tmp_path, 1))
    with pytest.raises(ckpt.UnreadableCheckpoint, match="none of the 2 checkpoints"):
        ckpt.load_resume("auto", tmp_path)


@pytest.mark.parametrize(
    "logged, kept",
    [
        # steps 1-3 and a line cut short by the kill, resumed from the checkpoint at step 2
        (
            '{"step": 1}\n{"step": 2}\n{"step": 2, "eval/knn": 50.0}\n{"step": 3}\n{"step": 4, "lo',
            '{"step": 1}\n{"step": 2}\n{"step": 2, "eval/knn": 50.0}\n',
        ),
        # killed right before the newline of step 2's eval line: the next line would be glued to it
        ('{"step": 1}\n{"step": 2}\n{"step": 2, "eval/knn": 50.0}', '{"step": 1}\n{"step": 2}\n'),
    ],
    ids=["past_the_step", "no_newline"],
)
def test_metrics_past_the_resumed_step_are_dropped(tmp_path, logged, kept):
    path = tmp_path / "metrics.jsonl"
    path.write_text(logged)
    drop_lines_after(path, 2)
    assert path.read_text() == kept
    assert not list(tmp_path.glob(".metrics*"))
