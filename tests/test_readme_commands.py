"""Every fenced shell line of README.md, run as written on a small stand-in.

The README's commands are what a newcomer types; tests that always pass an extra key can hide one that fails.
So the lines are read out of README.md itself and run with the same arguments, in a fresh working folder
(relative paths such as runs/<name>/ and pretrain_res50x1.pth.tar resolve there), with two substitutions only:

- an absolute path (/data/imagenet/train, /ckpt/moco_v2_800ep_pretrain.pth.tar) is re-rooted under the stand-in
  folder, which holds a small ImageFolder and teacher files of the official layouts with random weights;
- a checkpoint the README names after a finished run (runs/<name>/ckpt_epoch0130.pt) is the one the stand-in run
  of that recipe wrote.

The recipes train for 130 epochs; their runs here get SIGUSR1 once training has started, stop after their first
step and save (exit 75: the path a preempted run takes), which is enough to show the command starts, trains and
writes what the next lines read. An experiment=none command ("Your own folder on a CPU") runs to its end, on a
small folder of its own: it logs a loss at every epoch's end, in the run folder the README names. Lines that cannot run on one CPU are listed in SKIPPED with the reason; a line
that is neither run nor skipped fails the test, so a new README command needs a stand-in here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import logged_lines, make_image_folder

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Lines that do not run here, by their first words, and why.
SKIPPED = {
    "make test": "this suite is what it runs",
    "torchrun --nproc_per_node=8": "eight processes of a ResNet-50 teacher at batch 256: a GPU machine's line",
    "#!/bin/bash": "the Slurm job script: srun, scontrol and #SBATCH need a Slurm cluster",
    "pip install .": "make test runs it as written, in a fresh venv of torch alone (tests/check_light_install.py)",
    "pip install '.[train]'": "make install runs this install: its [test] extra includes [train]",
}
# Lines run here, by their first words: make's by test_make_lines_run_as_written, the rest on the stand-in.
RUN_PREFIXES = ("make demo", "make install", "python -m fastreg.", "python -c ")


def shell_blocks(text: str) -> list[list[str]]:
    """The ```bash blocks of `text`, each as its commands: continuation lines joined, comments and blanks dropped."""
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M)
    return [commands(block) for block in blocks]


def commands(block: str) -> list[str]:
    if block.startswith("#!"):  # a script: one unit
        return [block]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [strip_comment(line) for line in joined.splitlines()]
    return [line for line in lines if line]


def strip_comment(line: str) -> str:
    """The line without a trailing `# ...` comment: a # after whitespace, outside quotes, as bash reads it."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def reroot(command: str, stand_in: Path) -> str:
    """Absolute paths (a word, or a key=value's value, starting with /) re-rooted under `stand_in`."""
    return re.sub(r"(?<=[\s=])/(?=[A-Za-z])", f"{stand_in}/", command)


# ---------------------------------------------------------------- the stand-in


def resnet50_state(prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in torchvision.models.resnet50().state_dict().items()}


def moco_v2_checkpoint(path: Path) -> None:
    """MoCo-v2's release layout: {'state_dict': module.encoder_q.* with the 2048-2048-128 projection fc.0/fc.2}."""
    state = {k: v for k, v in resnet50_state("module.encoder_q.").items() if ".fc." not in k}
    state.update(
        {
            "module.encoder_q.fc.0.weight": torch.randn(2048, 2048) * 0.01,
            "module.encoder_q.fc.0.bias": torch.zeros(2048),
            "module.encoder_q.fc.2.weight": torch.randn(128, 2048) * 0.01,
            "module.encoder_q.fc.2.bias": torch.zeros(128),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 800, "arch": "resnet50"}, path)


def byol_checkpoint(path: Path) -> None:
    """byol-convert's layout (SimReg's pretrain_res50x1.pth.tar): torchvision's ResNet-50 keys, fc its classifier."""
    torch.save(resnet50_state(), path)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """<stand_in>/data/{imagenet,my_photos}/{train,val}, <stand_in>/ckpt/moco_v2_800ep_pretrain.pth.tar; the working
    folder <stand_in>/work holds pretrain_res50x1.pth.tar (the README names it relative to the working folder)."""
    root = tmp_path_factory.mktemp("stand_in")
    # one batch of 256 (the recipes' batch per process) and a few left over; 2 classes
    make_image_folder(root / "data/imagenet/train", classes=2, per_class=130, size=48)
    make_image_folder(root / "data/imagenet/val", classes=2, per_class=4, size=48, seed=1)
    # "Your own folder on a CPU": 3 steps per epoch at its batch of 32
    make_image_folder(root / "data/my_photos/train", classes=3, per_class=35, size=80)
    make_image_folder(root / "data/my_photos/val", classes=3, per_class=4, size=80, seed=1)
    (root / "imagenet").symlink_to(root / "data/imagenet")  # /imagenet/train: the cached recipe's example
    moco_v2_checkpoint(root / "ckpt/moco_v2_800ep_pretrain.pth.tar")
    (root / "work").mkdir()
    byol_checkpoint(root / "work/pretrain_res50x1.pth.tar")
    return root


def run(command: str, cwd: Path, stop_when: Path | None = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    """`command` in bash with the venv first on PATH (as `source .venv/bin/activate` leaves it). With
    `stop_when`: SIGUSR1 once that file (a run's train.log) says training started."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS")  # conftest's one thread is for tiny models; a newcomer's shell has none set
    proc = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if stop_when is not None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if stop_when.is_file() and "a step whose loss is NaN or inf" in stop_when.read_text():
                time.sleep(2)  # inside the first step, which takes far longer
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.5)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out)


# ---------------------------------------------------------------- the tests


def test_every_fenced_shell_line_is_run_or_skipped_with_a_reason():
    """The parse itself: each command of the README is either one this module runs or one SKIPPED names."""
    lines = [c for block in shell_blocks(README.read_text()) for c in block]
    assert len(lines) >= 10
    unknown = [c for c in lines if skip_reason(c) is None and not any(c.startswith(p) for p in RUN_PREFIXES)]
    assert not unknown, f"README commands this test neither runs nor skips: {unknown}"


def readme_commands() -> list[str]:
    return [c for block in shell_blocks(README.read_text()) for c in block if skip_reason(c) is None]


def test_readme_commands_run_on_a_stand_in(stand_in):
    work = stand_in / "work"
    done: dict[str, subprocess.CompletedProcess] = {}
    checkpoints: dict[str, Path] = {}  # runs/<name>/: the checkpoint its stand-in run wrote
    for command in readme_commands():
        if command.startswith("make "):
            continue  # test_make_lines_run_as_written
        line = reroot(command, stand_in)
        for name, path in checkpoints.items():
            line = re.sub(rf"runs/{name}/ckpt_epoch\d+\.pt", str(path.relative_to(work)), line)
        recipe = re.search(r"python -m fastreg\.train .*experiment=(?!none\b)(\S+)", line)
        if "experiment=none" in line:
            proc = run(line, work)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}"
            check_a_loss_every_epoch(line, work)
        elif recipe:
            run_dir = work / "runs" / recipe.group(1)
            proc = run(line, work, stop_when=run_dir / "train.log")
            assert proc.returncode == 75, f"{command}\n{proc.stdout[-3000:]}"
            saved = sorted(run_dir.glob("ckpt_epoch*.pt"))
            assert saved, f"{command}: no checkpoint after the stop\n{proc.stdout[-3000:]}"
            checkpoints[recipe.group(1)] = saved[-1]
        else:
            proc = run(line, work)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}"
        done[command] = proc
    printed = "\n".join(p.stdout for p in done.values())
    assert "linear_simreg" in printed  # fastreg.eval --linear simreg reported its figure
    assert "['fc.weight', 'fc.bias']" in printed  # the exported student loads with only fc.* missing
    assert (work / "resnet18_simreg.pt").is_file()


def check_a_loss_every_epoch(line: str, work: Path) -> None:
    """The run folder the README names for this experiment=none command holds a loss at each epoch's end, and the
    picture of its curves."""
    name = re.search(r"data\.root=\S*/(\w+)/train\b", line).group(1)  # /data/my_photos/train: runs/my_photos
    assert f"`runs/{name}/`" in README.read_text()
    epochs = int(re.search(r"trainer\.epochs=(\d+)", line).group(1))
    logged = [m["epoch"] for m in logged_lines(work / "runs" / name) if "loss" in m]
    assert [e for e in logged if e == int(e)] == list(range(1, epochs + 1)), logged
    assert (work / "runs" / name / "curves.png").stat().st_size > 0


def test_make_lines_run_as_written(tmp_path):
    """make install (with `source`) and make demo, in the repository as a newcomer runs them."""
    for command in [c for c in readme_commands() if c.startswith("make ")]:
        proc = run(command, REPO)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}"
        if command == "make demo":
            printed = re.search(
                r"student cnn_tiny, distilled\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)", proc.stdout
            )
            assert printed, proc.stdout[-3000:]
            # the table printed is in the run folder too, beside the run's curves
            figures = " | ".join(printed.groups())
            assert f"| student cnn_tiny, distilled | {figures} |" in (REPO / "runs/demo/results.md").read_text()
            assert (REPO / "runs/demo/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def python_blocks(text: str) -> dict[str, list[str]]:
    """The ```python blocks of `text` by the title of the ## section that holds them."""
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    found = {s.splitlines()[0]: re.findall(r"^```python\n(.*?)^```", s, flags=re.S | re.M) for s in sections}
    return {title: blocks for title, blocks in found.items() if blocks}


def test_every_python_block_is_run_or_skipped_with_a_reason():
    """The drop-in loop runs in tests/check_light_install.py (make light-install), the evaluation block below; the
    fused head's lines are a fragment that moves the head to a GPU (tests/test_mlp_head.py tests the head on CPU)."""
    assert {title: len(blocks) for title, blocks in python_blocks(README.read_text()).items()} == {
        "Evaluation protocols": 1,
        "The fused kernels in your own trainer": 2,
    }
    assert ".cuda()" in python_blocks(README.read_text())["The fused kernels in your own trainer"][1]


def test_the_evaluation_block_runs_as_written(tmp_path):
    """The README's python evaluation of a backbone, on a small stand-in of the demo's folders under $FASTREG_CACHE:
    it prints the three k-NN figures and a linear top-1."""
    [block] = python_blocks(README.read_text())["Evaluation protocols"]
    data = tmp_path / "cache" / "demo" / "digits40-v1"
    for split, per_class in (("train", 6), ("val", 3)):
        make_image_folder(data / split, classes=3, per_class=per_class, size=40, seed=per_class)
    env = {**os.environ, "FASTREG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    knn_line, linear_line = proc.stdout.splitlines()[-2:]
    assert set(eval(knn_line)) == {"knn20_majority", "knn20_weighted", "nn1"}
    assert 0 <= float(linear_line) <= 100
