"""A run folder holds one run (fastreg.run_folder): the same config resumes, another is refused before anything
changes, a fresh start moves the earlier run's files into previous/<UTC time>/ and deletes nothing, and pruning
keeps the checkpoint just written. Each case starts from a finished 2-epoch run's folder (16 images, batch 8:
2 steps per epoch, every checkpoint kept) and runs fastreg.train on it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import logged_lines, make_image_folder, tiny_overrides
from test_train import compose_cfg

from fastreg.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=8)


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(data, out), "trainer.keep_checkpoints=0", *extra]


@pytest.fixture(scope="module")
def earlier(data, tmp_path_factory) -> Path:
    """The folder of a finished run: ckpt_epoch0001.pt, ckpt_epoch0002.pt, train.log, metrics.jsonl, tb/, curves.png."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    train(compose_cfg(overrides(data, out, "trainer.epochs=2")))
    return out


@pytest.fixture
def run(earlier, tmp_path) -> Path:
    """A copy of the earlier run's folder for the case to run in."""
    return Path(shutil.copytree(earlier, tmp_path / "run"))


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path relative to it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def step(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"]


def test_a_fresh_start_moves_the_earlier_runs_files_aside_and_keeps_its_own_checkpoint(data, run, caplog):
    """The demo's case (trainer.resume=none, fewer epochs, in the folder of a finished run): the new run's
    ckpt_epoch0001.pt was pruned as the oldest of the folder, its logs went beside the earlier run's checkpoints,
    and the earlier ckpt_epoch0001.pt was written over."""
    before = files(run)
    with caplog.at_level(logging.INFO):
        train(
            compose_cfg(overrides(data, run, "trainer.epochs=1", "trainer.resume=none", "trainer.keep_checkpoints=1"))
        )
    [aside] = (run / "previous").iterdir()
    assert files(aside) == before  # the earlier run's every file, unchanged, none deleted
    assert sorted(p.name for p in run.iterdir()) == [
        "ckpt_epoch0001.pt",
        "curves.png",  # this run's: the earlier one's moved aside with its metrics
        "metrics.jsonl",
        "previous",
        "tb",
        "train.log",
    ]
    saved = torch.load(run / "ckpt_epoch0001.pt", weights_only=True)
    assert (saved["step"], saved["config"]["trainer"]["epochs"]) == (2, 1)
    log = (run / "train.log").read_text()
    moved = (
        f"moved the files of an earlier run that this one does not continue into {aside}: ckpt_epoch0001.pt, "
        "ckpt_epoch0002.pt, train.log, metrics.jsonl, tb, curves.png"
    )
    assert moved in log and moved in caplog.text
    assert "  epochs: 1\n" in log and "  epochs: 2\n" not in log  # this run's config only
    assert [m["step"] for m in logged_lines(run)] == [1, 2]


def test_resuming_with_another_config_is_refused_naming_the_keys_and_the_ways_out(data, run):
    before = files(run)
    with pytest.raises(ValueError) as refused:
        train(compose_cfg(overrides(data, run, "trainer.epochs=3")))
    message = str(refused.value)
    assert f"checkpoint {run / 'ckpt_epoch0002.pt'} was written with other settings" in message
    assert "trainer.epochs 2 -> 3" in message
    assert "name=<another> (runs/<another>)" in message
    assert f"trainer.resume=none (the files already in {run} move into {run}/previous/)" in message
    assert "trainer.resume_force=true" in message
    assert files(run) == before  # refused before anything in the folder changed


def test_the_same_config_resumes_a_finished_run_at_its_end(data, run, caplog):
    before = files(run)
    with caplog.at_level(logging.INFO):
        train(compose_cfg(overrides(data, run, "trainer.epochs=2")))
    assert f"resumed from {run / 'ckpt_epoch0002.pt'} (epoch 2, step 4" in caplog.text
    assert not (run / "previous").exists()
    assert {k: v for k, v in files(run).items() if k.endswith(".pt")} == {
        k: v for k, v in before.items() if k.endswith(".pt")
    }  # nothing to train, nothing saved


def test_going_back_to_an_older_checkpoint_moves_the_newer_ones_aside(data, run, caplog):
    """trainer.resume=<out_dir>/ckpt_epoch0001.pt in a folder that holds ckpt_epoch0002.pt: the later
    continuation goes into previous/ with a copy of the metrics, rather than being written over by this run's
    save of the same name (or picked by a later trainer.resume=auto)."""
    before = files(run)
    with caplog.at_level(logging.INFO):
        train(compose_cfg(overrides(data, run, "trainer.epochs=2", f"trainer.resume={run / 'ckpt_epoch0001.pt'}")))
    [aside] = (run / "previous").iterdir()
    assert files(aside) == {"ckpt_epoch0002.pt": before["ckpt_epoch0002.pt"], "metrics.jsonl": before["metrics.jsonl"]}
    assert f"into {aside}: ckpt_epoch0002.pt, metrics.jsonl (a copy)" in caplog.text
    assert (run / "ckpt_epoch0001.pt").read_bytes() == before["ckpt_epoch0001.pt"] and step(
        run / "ckpt_epoch0002.pt"
    ) == 4
    assert (
        f"{run / 'metrics.jsonl'}: dropping 2 line(s) past step 2, where this run starts: an earlier run in this "
        "folder logged them after the checkpoint this run resumes from"
    ) in caplog.text
    assert "stopped after its last checkpoint" not in caplog.text  # it had finished
    assert [m["step"] for m in logged_lines(run)] == [1, 2, 3, 4]


def test_a_newer_checkpoint_that_auto_skips_never_prunes_the_save_just_written(data, run, caplog):
    """A newer-numbered checkpoint that cannot be read (a copy gone wrong) next to a run resumed with
    trainer.resume_force and keep_checkpoints=1: pruning by number alone removed the epoch-3 save just written and
    kept the unreadable file."""
    (run / "ckpt_epoch0005.pt").write_text("not a checkpoint")
    with caplog.at_level(logging.INFO):
        train(
            compose_cfg(
                overrides(data, run, "trainer.epochs=3", "trainer.resume_force=true", "trainer.keep_checkpoints=1")
            )
        )
    assert "trainer.resume=auto skips it" in caplog.text
    assert sorted(p.name for p in run.glob("*.pt")) == ["ckpt_epoch0003.pt"]
    assert step(run / "ckpt_epoch0003.pt") == 6
    [aside] = (run / "previous").iterdir()
    assert (aside / "ckpt_epoch0005.pt").read_text() == "not a checkpoint"  # moved aside, not deleted
