"""Data-only throughput (images/s) of the training loaders, built exactly as the trainer builds them.

Each configuration goes through `fastreg.pipelines.build_loader(DataConfig(...))`, and its batches are
taken from `loader.epoch(0)`, `loader.epoch(1)`, ... in order, as the trainer takes them: a few warm-up
batches, then `--batches` timed ones (on CUDA, synchronized before the clock is read). Nothing consumes the
batches, so this is the most the loader can feed a training step. Epoch boundaries fall inside the timed
window when the data set is small; the torchvision loader starts its DataLoader workers anew at each epoch.

Every option that takes values sweeps them all (the product); settings a loader does not use (prefetch,
antialias, hw_decoder_load for torchvision; hw_decoder_load for DALI on the CPU) are left out and shown as
"-". `--repeats` measures every configuration that many times, interleaved, and reports the median.

    python -m benchmarks.data_throughput --root /tmp/jpegs --loader dali torchvision --workers 1 2 \\
        --json benchmarks/results/data.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.make_jpegs import make_image_folder
from fastreg.checkpoint import git_commit
from fastreg.config import DataConfig
from fastreg.pipelines import Batch, build_loader
from fastreg.placement import pick_device

DEFAULTS = DataConfig()
SWEPT = ("loader", "batch_size", "workers", "prefetch", "antialias", "hw_decoder_load")


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep = dict(action="extend", nargs="+")  # `--workers 1 2` and `--workers 1 --workers 2` both sweep
    parser.add_argument("--root", help="ImageFolder of JPEGs; default: generate --images JPEGs in a temp folder")
    parser.add_argument("--images", type=int, default=400, help="JPEGs to generate without --root (default 400)")
    parser.add_argument(
        "--loader", choices=("dali", "torchvision"), **sweep, help="data.loader (default: dali torchvision)"
    )
    parser.add_argument("--batch-size", type=int, **sweep, help="data.batch_size (default 32)")
    parser.add_argument("--crop-size", type=int, default=224, help="data.crop_size (default 224)")
    parser.add_argument(
        "--workers",
        type=int,
        **sweep,
        help="data.workers: DataLoader workers or DALI threads (default: usable CPU cores)",
    )
    parser.add_argument("--prefetch", type=int, **sweep, help=f"data.prefetch, DALI only (default {DEFAULTS.prefetch})")
    parser.add_argument(
        "--antialias",
        type=parse_bool,
        **sweep,
        help=f"data.antialias true|false, DALI only (default {str(DEFAULTS.antialias).lower()})",
    )
    parser.add_argument(
        "--hw-decoder-load",
        type=float,
        **sweep,
        help=f"data.hw_decoder_load, DALI on CUDA only (default {DEFAULTS.hw_decoder_load})",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (default 5)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches (default 30)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="measurements of each configuration; the median is reported (default 1)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="training device (auto: CUDA where visible): DALI decodes on it (dali-mixed) or on the CPU (dali-cpu)",
    )
    parser.add_argument("--json", type=Path, help="append one JSON line per configuration to this file")
    args = parser.parse_args(argv)
    try:
        args.device = pick_device(args.device, "--device").type
    except ValueError as e:
        parser.error(str(e))
    if min(args.warmup, args.batches - 1, args.repeats - 1) < 0:
        parser.error("need --warmup >= 0, --batches >= 1 and --repeats >= 1")
    return args


def configurations(args: argparse.Namespace) -> list[dict]:
    """The product of the swept values, without settings the loader ignores, each configuration once."""
    values = dict(
        loader=args.loader or ["dali", "torchvision"],
        batch_size=args.batch_size or [32],
        workers=args.workers or [len(os.sched_getaffinity(0))],
        prefetch=args.prefetch or [DEFAULTS.prefetch],
        antialias=args.antialias or [DEFAULTS.antialias],
        hw_decoder_load=args.hw_decoder_load or [DEFAULTS.hw_decoder_load],
    )
    unique = {}
    for combination in itertools.product(*(values[key] for key in SWEPT)):
        setting = dict(zip(SWEPT, combination))
        if setting["loader"] != "dali":
            setting.update(prefetch=None, antialias=None)
        if setting["loader"] != "dali" or args.device != "cuda":
            setting["hw_decoder_load"] = None
        unique.setdefault(tuple(setting.values()), setting)
    return list(unique.values())


def data_config(setting: dict, root: str, crop_size: int) -> DataConfig:
    """The DataConfig of a setting; the trainer's defaults stand in for what the loader ignores."""
    used = {key: value for key, value in setting.items() if value is not None}
    return DataConfig(root=root, crop_size=crop_size, **used)


def batch_stream(loader) -> Iterator[Batch]:
    """Batches of epochs 0, 1, 2, ... in order, as the trainer asks for them (DALI reads one pass per epoch)."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(loader, device: torch.device, warmup: int, batches: int) -> float:
    """Images per second over `batches` batches after `warmup` untimed ones."""
    stream = batch_stream(loader)
    try:
        for _ in range(warmup):
            next(stream)
        synchronize(device)
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += next(stream).images.shape[0]
        synchronize(device)
        return images / (time.perf_counter() - start)
    finally:
        stream.close()  # stops torchvision's workers now, not at garbage collection during the next run


def measure(setting: dict, root: str, args: argparse.Namespace) -> tuple[str, float]:
    """(loader name, images/s) of one freshly built loader."""
    device = torch.device(args.device)
    loader = build_loader(data_config(setting, root, args.crop_size), rank=0, world_size=1, seed=0, device=device)
    try:
        return loader.name, throughput(loader, device, args.warmup, args.batches)
    finally:
        # A DALI pipeline's threads and buffers go with the loader: free them before the next one runs.
        del loader
        gc.collect()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):  # no model name in /proc/cpuinfo: keep platform's
        pass
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def count_jpegs(root: str) -> int:
    return sum(path.suffix.lower() in (".jpg", ".jpeg") for path in Path(root).rglob("*"))


def cell(value) -> str:
    return "-" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def print_table(rows: list[dict], caption: str) -> None:
    table = Table(title="data-only throughput", caption=caption)
    for column in ("loader", "batch", "workers", "prefetch", "antialias", "hw load", "img/s", "runs"):
        table.add_column(column, justify="left" if column == "loader" else "right", no_wrap=True)
    best = max(row["img_per_s"] for row in rows)
    for row in rows:
        runs = ", ".join(f"{run:.0f}" for run in row["runs"])
        rate = f"{row['img_per_s']:.0f}"
        table.add_row(
            row["loader"],
            *(cell(row[key]) for key in SWEPT[1:]),
            f"[bold]{rate}[/bold]" if row["img_per_s"] == best else rate,
            runs,
        )
    console = Console()
    console.width = max(console.width, 100)  # piped output defaults to 80 columns, which wraps the table
    console.print(table)


def run_all(root: str, args: argparse.Namespace) -> list[dict]:
    """Every configuration `--repeats` times, round robin, so that a slow spell of the machine spreads over all."""
    settings = configurations(args)
    runs: list[list[float]] = [[] for _ in settings]
    names = [""] * len(settings)
    for repeat, (i, setting) in itertools.product(range(args.repeats), enumerate(settings)):
        names[i], rate = measure(setting, root, args)
        runs[i].append(rate)
        shown = ", ".join(f"{key}={cell(value)}" for key, value in setting.items() if value is not None)
        print(f"[{repeat + 1}/{args.repeats}] {shown}: {rate:.0f} img/s", file=sys.stderr)
    stamp = dict(
        device=device_name(args.device),
        date=datetime.date.today().isoformat(),
        commit=git_commit(),
        root=root,
        dataset_images=count_jpegs(root),
        crop_size=args.crop_size,
        warmup=args.warmup,
        batches=args.batches,
    )
    return [
        dict(setting, loader=name, img_per_s=statistics.median(rates), runs=rates, **stamp)
        for setting, name, rates in zip(settings, names, runs)
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    with ExitStack() as stack:
        root = args.root
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastreg-jpegs-"))
            make_image_folder(Path(root) / "train", args.images, classes=4, seed=0)
            # The dataset index of a throw-away folder goes with it, not into the user's cache.
            os.environ["FASTREG_CACHE"] = root
            root = str(Path(root) / "train")
        rows = run_all(root, args)
    print_table(
        rows, f"{rows[0]['device']}, crop {args.crop_size}, {args.batches} timed batches, median of {args.repeats}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
