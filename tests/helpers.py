"""Small generated ImageFolders and configs for fast CPU training tests, what they compare runs by, and what
torch.compile sees a Triton kernel write."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_image_folder(root: Path, classes: int = 2, per_class: int = 16, size: int = 36, seed: int = 0) -> Path:
    """JPEGs whose colour and stripe direction depend on the class, with noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += 120
            if c % 2:
                img[::4] = 255
            else:
                img[:, ::4] = 255
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def tiny_overrides(data_root: Path, out_dir: Path) -> list[str]:
    """A tiny CNN teacher (random weights) and student, fp32, deterministic."""
    return [
        "experiment=none",
        "teacher=cnn_small",
        "teacher.checkpoint=random",
        "student=cnn_tiny",
        f"data.root={data_root}",
        "data.crop_size=32",
        "data.batch_size=8",
        "data.workers=0",
        "eval.workers=0",
        "optim.base_lr=2.0",
        "trainer.precision=fp32",
        "trainer.log_every=1",
        "trainer.progress=false",
        "trainer.deterministic=true",
        "trainer.device=cpu",
        f"trainer.out_dir={out_dir}",
    ]


def logged_lines(run: Path) -> list[dict]:
    """metrics.jsonl's lines, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in logged_lines(run) if "loss" in m}


def trained_state(path: Path) -> dict:
    """What training changes, from a checkpoint: weights, loss buffers (SEED's queue), optimizer and scaler."""
    state = torch.load(path, weights_only=True)
    return {
        "student": state["student"],
        "heads": state["heads"],
        "loss": state["loss"],
        "optimizer": state["optimizer"]["state"],
        "scaler": state["scaler"],
    }


def assert_equal_states(a, b, where=""):
    """Nested dicts of tensors (and numbers) equal bitwise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def make_photo_folder(
    root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (64, 48), seed: int = 0
) -> Path:
    """JPEGs cut from real photographs (scikit-learn's sample images): natural colour and texture
    statistics, unlike stripes or noise, for comparing decoders and resamplers."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photos[rng.integers(len(photos))]
            h, w = rng.integers(150, 400), rng.integers(200, 600)
            y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
            crop = Image.fromarray(photo[y : y + h, x : x + w]).resize(size, Image.BILINEAR)
            crop.save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


# ------------------------------------------ files that must never reach DALI, and odd ones that may


def noise(mode="RGB", size=16):
    channels = {"RGB": 3, "CMYK": 4}.get(mode)
    shape = (size, size, channels) if channels else (size, size)
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8), mode)


def write_truncated(path):
    noise().save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Each bad kind: how to write it, and how its reason starts.
BAD = {
    "corrupt": (lambda p: p.write_bytes(np.random.default_rng(2).bytes(500)), "not an image"),
    "truncated": (write_truncated, "truncated: "),
    "zero": (lambda p: p.write_bytes(b""), "zero bytes"),
}

# Files that look odd but that both loaders decode (ImageNet has 22 CMYK JPEGs and a PNG named .JPEG): how to
# write each.
ODD_BUT_READABLE = {
    "cmyk": lambda p: noise("CMYK").save(p, format="JPEG"),
    "png_named_jpg": lambda p: noise().save(p, format="PNG"),
}


def add_bad_files(root):
    for name, (write, _) in BAD.items():
        write(root / "class1" / f"{name}.jpg")


def add_odd_files(root):
    for name, write in ODD_BUT_READABLE.items():
        write(root / "class1" / f"{name}.jpg")


def overwrite_in_place(path: Path, data: bytes = bytes(64)) -> None:
    """Write `data` over the file's first bytes, keeping its size, and set its atime and mtime back: what a
    failing disk or a careless script does, which neither `ls -l` nor a size-and-mtime fingerprint sees. Only
    the ctime tells (no call can set it back)."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def loop_link(path: Path) -> None:
    """Replace the file with a symlink to itself: unreadable (ELOOP) even for root, whom chmod does not stop."""
    path.unlink()
    path.symlink_to(path.name)


def stopped_by_a_file(root: Path, rel: str, reason: str, reader: str = re.escape("the torchvision loader")) -> str:
    """The message of a loader (`reader`, a pattern) stopped by `rel`, which the index now leaves out for `reason`: a
    pattern for pytest's match."""
    return (
        re.escape(f"{root}: ")
        + reader
        + re.escape(
            f" stopped on 1 file(s) that changed since the index was built and now fail the decode check: {rel} "
            f"({reason}). The index now leaves them out, so the same command runs without them. To read and check "
            f"every file of the folder again, run python -m fastreg.index {root} --recheck"
        )
    )


class LaunchRecorder:
    """Stands in for a Triton kernel (kernel[grid](...)): appends (kernel, {parameter name: argument}) to
    launches instead of launching."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, {**dict(zip(self.kernel.arg_names, args)), **kwargs}))

        return launch


def assert_compile_friendly_layout(kernel, kwargs: dict) -> None:
    """No None argument, and every pointer before every scalar: the layout torch.compile's analysis and inductor's
    launcher read the same way."""
    name = getattr(kernel, "fn", kernel).__name__
    assert all(value is not None for value in kwargs.values()), f"{name}: a None argument"
    pointers = [n for n in kernel.arg_names if isinstance(kwargs.get(n), torch.Tensor)]
    assert kernel.arg_names[: len(pointers)] == pointers, f"{name}: a scalar between the pointers"


class _CudaTarget:
    """A CUDA target for Triton's front end, so TTIR can be generated (not compiled) on a machine without a GPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def tensors_compile_sees_written(kernel, kwargs: dict) -> set[str]:
    """The kernel arguments torch.compile treats as written: its own analysis of the kernel's TTIR, which decides
    what functionalization clones and keeps (a written tensor it misses keeps its stale contents)."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap
    from triton.runtime import driver

    try:
        driver.active.get_current_target()
        fake = False
    except RuntimeError:  # no GPU driver here
        driver.set_active(_CudaTarget())
        fake = True
    try:
        if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
            accesses = wrap.identify_accessed_tensors(kernel, dict(kwargs), {})
            return {dep.name for dep in accesses.read_writes.writes}
        return set(wrap.identify_mutated_tensors(kernel, dict(kwargs), {}))
    finally:
        if fake:
            driver._active = None  # as before: reset_active() would look for a GPU driver


def run_two_ranks(script: Path, args: list[str], timeout: int = 300, env: dict | None = None):
    """`script` in two processes through torch.distributed.run (gloo on a CPU), its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=env)


def run_two_processes(script: Path, args: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`script` as ranks 0 and 1 of one gloo group, each its own process, as the README's srun launch starts them
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): no agent stops a rank when another fails. Rank 0's
    process holds the group's store. Each rank's output captured."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                **dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            },
        )
        for r in range(2)
    ]
    outputs = [rank.communicate(timeout=timeout) for rank in ranks]
    return [subprocess.CompletedProcess(rank.args, rank.returncode, *out) for rank, out in zip(ranks, outputs)]


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


def signal_when(
    command: list[str], cwd: Path, env: dict | None, sig: signal.Signals, ready
) -> subprocess.CompletedProcess:
    """Run `command`, send it `sig` as soon as it handles `sig` and ready() holds, and wait for it to end. A signal
    in the interpreter's first fraction of a second, before the program's first line installs its handler, would
    meet the default handler whatever the program does."""
    with launched(command, cwd, env, stdout=subprocess.DEVNULL) as proc:  # rank 0's log is in train.log
        deadline = time.monotonic() + 240
        while not (catches(proc.pid, sig) and ready()):
            assert proc.poll() is None and time.monotonic() < deadline, "ended or hung before the signal"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(command, proc.returncode, "", stderr)


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (Linux: the SigCgt mask of /proc/<pid>/status)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) >> (sig - 1) & 1)
