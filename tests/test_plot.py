"""python -m fastreg.plot RUN_DIR and the trainer's curves.png: the curves drawn are the file's values, bad input is
one line naming the file and line, and a picture that cannot be drawn costs the run nothing."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import logged_lines, make_image_folder, tiny_overrides
from PIL import Image
from test_train import compose_cfg

from fastreg import plot
from fastreg.train import train

# Two teachers, a warmup then a decay, and two evaluations: the values each panel must show.
STEPS = [1, 2, 3, 4]
LOSS = [2.0, 1.5, 1.0, 0.75]
LOSS_A, LOSS_B = [1.25, 1.0, 0.5, 0.5], [0.75, 0.5, 0.5, 0.25]
LR = [0.05, 0.1, 0.075, 0.025]
KNN = {
    "knn20_majority": ([2, 4], [30.0, 55.5]),
    "knn20_weighted": ([2, 4], [31.0, 56.0]),
    "nn1": ([2, 4], [20.0, 40.0]),
}


def step_lines() -> list[dict]:
    return [
        {"step": s, "loss": loss, "loss/a": a, "loss/b": b, "cos/a": 0.5, "lr": lr, "img_per_s": 9.0, "epoch": s / 2}
        for s, loss, a, b, lr in zip(STEPS, LOSS, LOSS_A, LOSS_B, LR)
    ]


def eval_line(i: int) -> dict:
    return {"step": KNN["nn1"][0][i], **{f"eval/{k}": values[i] for k, (_, values) in KNN.items()}}


def write_run(folder: Path, lines: list[dict], tail: str = "") -> Path:
    """A run folder whose metrics.jsonl holds `lines` (as the trainer writes them) and then `tail` as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return folder


def drawn(fig) -> list[tuple[str, str, dict[str, tuple[list, list]]]]:
    """Each axes' title, y label and the lines drawn on it: {label: (x, y)}, read back from the Figure."""
    return [
        (
            ax.get_title(),
            ax.get_ylabel(),
            {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines},
        )
        for ax in fig.axes
    ]


def epoch_axes(fig) -> list[str]:
    """The x labels of the axes drawn on top of the panels."""
    return [child.get_xlabel() for ax in fig.axes for child in ax.child_axes]


def plot_cli(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastreg.plot", str(run)], capture_output=True, text=True, timeout=120)


def test_the_cli_draws_the_files_values(tmp_path):
    lines = step_lines()
    run = write_run(tmp_path / "run", [*lines[:2], eval_line(0), *lines[2:], eval_line(1)])
    proc = plot_cli(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"wrote {run / 'curves.png'}; points per panel: training loss 4, learning rate 4, k-NN on data.val_root 2\n"
    )
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.load()  # a full decode
        assert img.format == "PNG" and img.size == (1500, 400)  # 3 panels of 5 x 4 inches at 100 dpi

    _, fig = plot.write_curves(run)
    assert drawn(fig) == [
        ("training loss", "loss", {"loss": (STEPS, LOSS), "loss/a": (STEPS, LOSS_A), "loss/b": (STEPS, LOSS_B)}),
        ("learning rate", "lr", {"lr": (STEPS, LR)}),
        ("k-NN on data.val_root", "val top-1 %", KNN),
    ]
    assert epoch_axes(fig) == ["epoch"] * 3  # "epoch" (step / 2) in the step lines
    assert [ax.get_xlabel() for ax in fig.axes] == ["step"] * 3


def test_a_panel_with_nothing_to_show_says_so(tmp_path):
    """One teacher (its loss/<teacher> is the loss: drawn once) and no evaluation yet."""
    lines = [{"step": s, "loss": loss, "loss/a": loss, "lr": lr} for s, loss, lr in zip(STEPS, LOSS, LR)]
    _, fig = plot.write_curves(write_run(tmp_path / "run", lines))
    loss, lr, knn = drawn(fig)
    assert loss[2] == {"loss": (STEPS, LOSS)} and lr[2] == {"lr": (STEPS, LR)} and knn[2] == {}
    [text] = [ax for ax in fig.axes if ax.get_title() == knn[0]][0].texts
    assert text.get_text().startswith("no k-NN evaluation yet:\ndata.val_root is not set")
    assert epoch_axes(fig) == []  # no "epoch" in the lines


def test_a_last_line_cut_short_is_left_out_with_a_warning(tmp_path):
    """What a run being written (or killed mid-line) leaves: every line before it is drawn."""
    run = write_run(tmp_path / "run", step_lines(), tail='{"step": 5, "loss": 0.7')
    proc = plot_cli(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        f"WARNING: {run / 'metrics.jsonl'}, line 5: cut short (the run is writing it, or was killed while it did): "
        "left out\n"
    )
    assert "training loss 4," in proc.stdout


@pytest.mark.parametrize(
    "case, content, message",
    [
        ("no_folder", None, "{run} is not a folder: give a run folder (runs/<name>, trainer.out_dir)"),
        ("no_metrics", None, "{run}/metrics.jsonl not found: {run} is not a run folder, or its run has not started"),
        ("empty", "", "{run}/metrics.jsonl holds no complete line: the run has logged no step yet"),
        ("not_json", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": }\n', "{run}/metrics.jsonl, line 2: not JSON"),
        ("not_an_object", '{"step": 1}\n[1, 2]\n', "{run}/metrics.jsonl, line 2: [1, 2] is not a metrics record"),
        ("no_step", '{"loss": 2.0}\n', '{run}/metrics.jsonl, line 1: {{"loss": 2.0}} is not a metrics record'),
        ("not_a_number", '{"step": 1}\n{"step": 2, "lr": "0.1"}\n', '{run}/metrics.jsonl, line 2: lr="0.1" is not'),
    ],
)
def test_bad_input_is_one_line_and_draws_nothing(tmp_path, case, content, message):
    run = tmp_path / "run"
    if case != "no_folder":
        run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    proc = plot_cli(run)
    print(f"[{case}] {proc.stderr.strip()}")  # pytest -s shows them
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: " + message.format(run=run)), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (run / "curves.png").exists()


# ---------------------------------------------------------------- the trainer's picture


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 2-epoch run with a k-NN evaluation after each epoch (16 images, batch 8: 2 steps an epoch), and
    its overrides."""
    tmp = tmp_path_factory.mktemp("plot")
    data = make_image_folder(tmp / "data", per_class=8)
    overrides = [
        *tiny_overrides(data, tmp / "run"),
        f"data.val_root={data}",
        "trainer.epochs=2",
        "trainer.eval_every=1",
    ]
    train(compose_cfg(overrides))
    return tmp / "run", overrides


def test_a_run_ends_with_its_curves_drawn_after_the_final_evaluation(finished):
    run, _ = finished
    lines = logged_lines(run)
    assert [line["step"] for line in lines if "eval/nn1" in line] == [2, 4]  # the final one at the last step
    picture = (run / "curves.png").read_bytes()
    with Image.open(run / "curves.png") as img:
        img.load()
        assert img.size == (1500, 400)
    panels, _ = plot.write_curves(run)  # drawn again from the whole metrics.jsonl
    assert (run / "curves.png").read_bytes() == picture  # the same picture: the trainer drew every line
    assert panels[2].series["nn1"] == ([2, 4], [line["eval/nn1"] for line in lines if "eval/nn1" in line])


def test_a_picture_that_cannot_be_drawn_is_a_warning_and_the_run_ends(finished, tmp_path, caplog):
    """The finished run again with the same command: it resumes at its end, has nothing to do, and draws its
    curves once more, where now a folder holding a file stands in curves.png's way."""
    earlier, overrides = finished
    run = Path(shutil.copytree(earlier, tmp_path / "run"))
    (run / "curves.png").unlink()
    (run / "curves.png").mkdir()
    (run / "curves.png" / "keep").write_text("a file in the way")
    overrides = [o if not o.startswith("trainer.out_dir=") else f"trainer.out_dir={run}" for o in overrides]
    with caplog.at_level(logging.WARNING):
        results = train(compose_cfg(overrides))
    assert set(results) == {"knn20_majority", "knn20_weighted", "nn1"}  # the logged results, as after any run
    [warning] = [r.getMessage() for r in caplog.records if r.name == "fastreg.plot"]
    assert warning.startswith(f"{run / 'curves.png'} was not drawn (IsADirectoryError: ")
    assert warning.endswith(f"the run itself is complete. python -m fastreg.plot {run} draws it again")
    assert (run / "curves.png" / "keep").read_text() == "a file in the way"
    assert not list(run.glob(".curves.png.tmp*"))  # atomic_write removed its temporary file
