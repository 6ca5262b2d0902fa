"""Per-GPU throughput of one distillation configuration: data-only, compute-only and end-to-end, and ablations.

    python -m benchmarks.throughput experiment=simreg_r50_r18 teacher.checkpoint=random data.root=/imagenet/train
    python -m benchmarks.throughput --ablate experiment=simreg_r50_r18 ...   # from the official-style baseline up

The arguments after the flags are the training config's (hydra groups and keys, as for fastreg.train). The
modes run one after another in this process, on one device:
  data     the loader alone, synchronized after every batch: the most it can feed
  compute  Trainer.train_step on one batch kept on the device (data.loader=synthetic): the step's ceiling
  e2e      Trainer.train_step fed by the real loader
Each mode: warm-up steps excluded; img/s per window of --window steps (median, min, max); per step the data
wait (asking the loader for a batch until it is there) and the compute (the step), from CUDA events on a GPU
and the host clock on CPU; peak memory; GPU telemetry (fastreg.monitor). e2e / compute < 1 means data costs
something, and `data_limit` names how: "starved" (the step waits for batches) or "contention" (the loader's GPU
work slows the step itself), with both figures. --ablate adds e2e rows that switch the speed-ups on one by one
(ABLATION); --distill-modes adds e2e rows of the official codes' other ways to distill next to the command's own
(DISTILL_MODES: a cached teacher, SEED's small patches, weak/strong views).

Results: benchmarks/results/<gpu or cpu>/<date>-<commit>.json (device, versions, config, every figure), a
markdown table beside it and two PNGs (img/s per ablation row; data wait and compute per step and mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module

from benchmarks.data_throughput import batch_stream, device_name
from fastreg.cache_writer import write_cache
from fastreg.cached_teacher import FEATURES
from fastreg.checkpoint import git_commit
from fastreg.config import TrainConfig, to_config
from fastreg.distributed import setup_distributed
from fastreg.monitor import GPUMonitor
from fastreg.pipelines import Batch, build_loader
from fastreg.trainer import Trainer

# (row, overrides added to the previous row's). The baseline is the official SimReg code path: a torchvision
# ImageFolder decoded by PIL in DataLoader workers, fp32, NCHW, eager PyTorch, no fused kernels.
ABLATION = [
    (
        "baseline",
        [
            "data.loader=torchvision",
            "trainer.precision=fp32",
            "trainer.channels_last=false",
            "trainer.compile=false",
            "head.impl=eager",
            "loss.impl=eager",
            "teacher.inference=eager",
        ],
    ),
    ("+AMP (bf16)", ["trainer.precision=bf16"]),
    ("+channels_last", ["trainer.channels_last=true"]),
    ("+DALI", ["data.loader=dali"]),
    ("+folded teacher", ["teacher.inference=folded"]),
    ("+compiled teacher", ["teacher.compile=true"]),
    ("+compile", ["trainer.compile=true"]),
    ("+Triton kernels", ["head.impl=triton", "loss.impl=triton"]),
    ("+CUDA graph (whole step)", ["trainer.cuda_graph=true"]),
]
# (row, overrides on top of the command's, each row on its own): how the step runs, compute-only. Picks
# trainer.compile_mode and whether trainer.cuda_graph pays.
STEP_VARIANTS = [
    ("eager", ["trainer.compile=false", "trainer.cuda_graph=false"]),
    *(
        (f"compile {mode}", ["trainer.compile=true", f"trainer.compile_mode={mode}", "trainer.cuda_graph=false"])
        for mode in ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
    ),
    ("CUDA graph (whole step)", ["trainer.compile=false", "trainer.cuda_graph=true"]),
    (
        "CUDA graph + compile default",
        ["trainer.compile=true", "trainer.compile_mode=default", "trainer.cuda_graph=true"],
    ),
]
# (row, overrides on top of the command's, each row on its own): what each of the official codes' other setups costs,
# e2e, next to the command's own. The cached teacher's file is written first, untimed ({cache}); the SEED rows
# switch the loss to SEED's (its small patches need its second queue), so compare the two of them with each other.
DISTILL_MODES = [
    ("as configured", []),
    ("cached teacher (SimReg --use_cache)", ["teacher.cache={cache}"]),
    (
        "weak teacher view, strong student view (SimReg --weak_strong)",
        ["data.augment=strong", "data.teacher_view=weak"],
    ),
    ("SEED, one view", ["loss=seed", "head=seed", "data.augment=strong"]),
    ("SEED + 6 small patches of 96 px", ["loss=seed", "head=seed", "data.augment=strong", "data.small_patches=6"]),
]
CUDA_ONLY = "trainer.cuda_graph=true"  # a row with it is recorded as not run on a CPU
MODES = ("data", "compute", "e2e")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per mode (and per ablation row)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing: compile, autotune, caches")
    parser.add_argument("--window", type=int, default=10, help="steps per img/s window")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--ablate", action="store_true", help="also the ablation rows (e2e each)")
    parser.add_argument(
        "--step-variants",
        action="store_true",
        help="also compute-only rows for each way to run the step (STEP_VARIANTS)",
    )
    parser.add_argument(
        "--distill-modes",
        action="store_true",
        help="also e2e rows for a cached teacher, weak/strong views and SEED's small patches (DISTILL_MODES)",
    )
    parser.add_argument(
        "--distill-rows",
        type=int,
        default=len(DISTILL_MODES),
        help="with --distill-modes, only DISTILL_MODES' first N rows (2: the teacher online and cached)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if o.startswith("-") or "=" not in o]:
        parser.error(f"unknown flag(s) {bad}: after the flags come training overrides, key=value")
    if args.steps < args.window or args.window < 1 or args.warmup < 0:
        parser.error(f"need --steps >= --window >= 1 and --warmup >= 0; got {args.steps}, {args.window}, {args.warmup}")
    if not 1 <= args.distill_rows <= len(DISTILL_MODES):
        parser.error(f"--distill-rows must be 1 to {len(DISTILL_MODES)}; got {args.distill_rows}")
    return args, overrides


def compose_config(overrides: list[str], out_dir: Path) -> TrainConfig:
    """The training config; nothing of the benchmark is saved, resumed or evaluated."""
    forced = [f"trainer.out_dir={out_dir}", "trainer.resume=none", "trainer.progress=false", "data.val_root=null"]
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        cfg = to_config(compose("config", overrides=[*overrides, *forced]))
    if cfg.demo:
        raise SystemExit(
            "the benchmark needs a training config: pass experiment=<name> (or experiment=none) "
            "and data.root=<ImageFolder>; see the module docstring"
        )
    return cfg


# ---------------------------------------------------------------------------------------------------- timing


class Clock:
    """Timestamps on the device's timeline: CUDA events on a GPU (read once at the end, no sync per step),
    the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def time_steps(
    batches: Iterator[Batch],
    step: Callable[[Batch], object],
    clock: Clock,
    args: argparse.Namespace,
    batch_size: int,
) -> dict:
    """Warm-up, then --steps timed steps: img/s per window, mean data wait and compute per step (ms)."""
    for _ in range(args.warmup):
        step(next(batches))
    clock.sync()
    marks = []
    for _ in range(args.steps):
        start = clock.now()
        batch = next(batches)
        fetched = clock.now()
        step(batch)
        marks.append((start, fetched, clock.now()))
    clock.sync()
    wait = [clock.ms(s, f) for s, f, _ in marks]
    compute = [clock.ms(f, e) for _, f, e in marks]
    windows = [marks[i : i + args.window] for i in range(0, args.steps - args.window + 1, args.window)]
    ips = [batch_size * len(w) / clock.ms(w[0][0], w[-1][2]) * 1e3 for w in windows]
    return {
        "img_per_s": statistics.median(ips),
        "img_per_s_min": min(ips),
        "img_per_s_max": max(ips),
        "windows": len(ips),
        "data_wait_ms": statistics.fmean(wait),
        "compute_ms": statistics.fmean(compute),
    }


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is KiB on Linux and the peak over the process's life, not per mode
    return {"process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def measured(device: torch.device, run: Callable[[], dict]) -> dict:
    """run()'s figures with the peak memory and the GPU telemetry over it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GPUMonitor(device) as monitor:
        figures = run()
    return {**figures, **peak_memory(device), "gpu": monitor.summary()}


# ----------------------------------------------------------------------------------------------------- modes


def data_mode(cfg: TrainConfig, args: argparse.Namespace, device: torch.device) -> dict:
    t = cfg.trainer
    loader = build_loader(
        cfg.data,
        rank=0,
        world_size=1,
        seed=t.seed,
        device=device,
        memory_format=torch.channels_last if t.channels_last else torch.contiguous_format,
        half=t.precision != "fp32",
    )
    clock, stream = Clock(device), batch_stream(loader)
    try:
        figures = time_steps(stream, lambda batch: clock.sync(), clock, args, cfg.data.batch_size)
    finally:
        stream.close()  # stops torchvision's workers now, not during the next mode
    return {**figures, "loader": loader.name}


def step_mode(cfg: TrainConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """Trainer.train_step fed by cfg's loader (synthetic for compute)."""
    trainer = Trainer(cfg)
    trainer.distiller.train()
    stream = batch_stream(trainer.loader)
    try:
        figures = time_steps(stream, trainer.train_step, Clock(device), args, cfg.data.batch_size)
    finally:
        stream.close()
        trainer.log.close()
    return {**figures, **implementations(trainer)}


def implementations(trainer: Trainer) -> dict:
    """What ran: the loader, the head and loss implementations, precision, layout, compile, and the trainable
    parameters (student and heads: what DDP all-reduces, see benchmarks.scaling)."""
    t = trainer.cfg.trainer
    return {
        "loader": trainer.loader.name,
        "precision": t.precision,
        "channels_last": t.channels_last,
        "compile": t.compile,
        "compile_mode": t.compile_mode,
        "cuda_graph": t.cuda_graph,
        "loss": trainer.cfg.loss.name,
        "teacher_view": trainer.cfg.data.teacher_view,
        "small_patches": trainer.cfg.data.small_patches,
        **trainer.distiller.implementations(),
        "trainable_params": sum(p.numel() for p in trainer.distiller.trainable_parameters()),
    }


def run_mode(mode: str, overrides: list[str], args: argparse.Namespace, work: Path) -> dict:
    if mode == "compute":
        overrides = [*overrides, "data.loader=synthetic", f"data.synthetic_batches={args.warmup + args.steps}"]
    cfg = compose_config(overrides, work / mode)
    _, _, device = setup_distributed(cfg.trainer.device)
    figures = measured(device, lambda: (data_mode if mode == "data" else step_mode)(cfg, args, device))
    gc.collect()  # the mode's loader, models and DALI pipelines go before the next mode builds its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(
        f"{mode:>8}: {figures['img_per_s']:,.0f} img/s (windows {figures['img_per_s_min']:,.0f}-"
        f"{figures['img_per_s_max']:,.0f}), data wait {figures['data_wait_ms']:.2f} ms + compute "
        f"{figures['compute_ms']:.2f} ms per step, {figures['loader']}",
        flush=True,
    )
    return figures


def ablation(overrides: list[str], args: argparse.Namespace, work: Path, device: torch.device) -> list[dict]:
    """ABLATION's rows, each adding its overrides to the previous row's, e2e."""
    added, steps = [], []
    for name, delta in ABLATION:
        added = [*added, *delta]
        steps.append((name, added))
    return run_rows(steps, "e2e", overrides, args, work, device)


def step_variants(overrides: list[str], args: argparse.Namespace, work: Path, device: torch.device) -> list[dict]:
    return run_rows(STEP_VARIANTS, "compute", overrides, args, work, device)


def distill_modes(
    overrides: list[str], args: argparse.Namespace, work: Path, device: torch.device
) -> tuple[list[dict], dict]:
    """DISTILL_MODES' first --distill-rows rows, e2e, after writing the first teacher's cache of data.root
    (fastreg.cache_teacher); and that write's time: the whole call, teacher build and loader start-up included."""
    if compose_config(overrides, work / "cache").data.loader == "synthetic":
        raise SystemExit("--distill-modes runs e2e on a dataset: drop data.loader=synthetic, pass data.root=")
    cache = work / "teacher_cache"
    arguments = ["--teacher", "0", "--dtype", "float16", *overrides]  # what meta.json says wrote it
    start = time.perf_counter()
    write_cache(compose_config(overrides, work / "cache"), cache, 0, "float16", arguments)
    seconds = time.perf_counter() - start
    images, dim = np.load(cache / FEATURES, mmap_mode="r").shape
    cache_write = {"images": images, "dim": dim, "seconds": seconds, "img_per_s": images / seconds}
    print(f"cache written: {images} images x {dim} in {seconds:.1f} s, start-up included", flush=True)
    rows = [(name, [o.format(cache=cache) for o in delta]) for name, delta in DISTILL_MODES[: args.distill_rows]]
    return run_rows(rows, "e2e", overrides, args, work, device), cache_write


def run_rows(
    rows: list[tuple[str, list[str]]],
    mode: str,
    overrides: list[str],
    args: argparse.Namespace,
    work: Path,
    device: torch.device,
) -> list[dict]:
    """One `mode` run per (row, its overrides), with the speed-up over the first row."""
    results = []
    for name, delta in rows:
        print(f"{mode} row {name}: {' '.join(delta)}", flush=True)
        if device.type == "cpu" and CUDA_ONLY in delta:
            results.append({"row": name, "overrides": delta, "not_run": "needs a CUDA device"})
            continue
        results.append({"row": name, "overrides": delta, **run_mode(mode, [*overrides, *delta], args, work)})
        results[-1]["speedup"] = results[-1]["img_per_s"] / results[0]["img_per_s"]
    return results


# --------------------------------------------------------------------------------------------------- results


def environment(device: torch.device) -> dict:
    return {
        "device": device.type,
        "device_name": device_name(device.type),
        "driver": nvidia_driver(device),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "triton": version("triton"),
        "dali": version("nvidia.dali"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def nvidia_driver(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - a record of the machine only: the figures stand without it
        return None


MATERIAL = 0.05  # a share of the step that counts: data wait of the e2e step, or compute added by the loader


def data_limit(e2e: dict, compute: dict) -> str:
    """How the data pipeline limits the e2e run, with both figures: "starved" when the step waits for batches
    (data wait >= 5% of the e2e step), "contention" when the loader's GPU work slows the step itself (e2e compute
    per step >= 5% above compute-only's); both can hold; else "data keeps up"."""
    step = e2e["data_wait_ms"] + e2e["compute_ms"]
    wait_share, slowdown = e2e["data_wait_ms"] / step, e2e["compute_ms"] / compute["compute_ms"] - 1
    figures = (
        f"data wait {e2e['data_wait_ms']:.2f} ms/step ({wait_share:.0%} of the e2e step); compute "
        f"{e2e['compute_ms']:.2f} ms/step with the loader running, {compute['compute_ms']:.2f} without "
        f"({slowdown:+.0%})"
    )
    named = [name for name, hit in (("starved", wait_share >= MATERIAL), ("contention", slowdown >= MATERIAL)) if hit]
    return f"{' and '.join(named) or 'data keeps up'}: {figures}"


def result_stem(out: Path, env: dict, tag: str = "") -> Path:
    """<out>/<gpu or cpu>/<date>-<commit>[-tag]"""
    folder = "cpu" if env["device"] == "cpu" else env["device_name"].replace(" ", "_")
    return out / folder / f"{env['date']}-{env['commit'][:12]}{'-' + tag if tag else ''}"


def markdown(result: dict) -> str:
    env, modes = result["env"], result["modes"]
    lines = [
        f"# Throughput on {env['device_name']} ({env['date']}, commit {env['commit'][:12]})",
        "",
        f"torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, triton {env['triton']}; "
        f"teacher(s) {', '.join(t['arch'] for t in result['config']['teachers'])} -> student "
        f"{result['config']['student']['arch']}, batch {result['config']['data']['batch_size']}, "
        f"crop {result['config']['data']['crop_size']}.",
        "",
        "| mode | img/s (median) | window min-max | data wait ms/step | compute ms/step | loader |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for mode, f in modes.items():
        lines.append(
            f"| {mode} | {f['img_per_s']:,.0f} | {f['img_per_s_min']:,.0f}-{f['img_per_s_max']:,.0f} | "
            f"{f['data_wait_ms']:.2f} | {f['compute_ms']:.2f} | {f['loader']} |"
        )
    if "e2e_over_compute" in result:
        lines += ["", f"e2e / compute = {result['e2e_over_compute']:.2f}: {result['limit']}"]
    titles = (
        ("ablation", "ablation row (e2e)"),
        ("step_variants", "step variant (compute-only)"),
        ("distill_modes", "distillation mode (e2e)"),
    )
    for key, title in titles:
        if result.get(key):
            lines += [
                "",
                f"| {title} | img/s | speed-up | loader | teachers | heads | fused loss |",
                "|---|--:|--:|---|---|---|---|",
                *map(row_line, result[key]),
            ]
    if c := result.get("cache_write"):
        lines += [
            "",
            f"Cache written first (fastreg.cache_teacher's write_cache, float16): {c['images']:,} images x {c['dim']} "
            f"in {c['seconds']:.1f} s, {c['img_per_s']:,.0f} img/s, teacher build and loader start-up included.",
        ]
    return "\n".join(lines) + "\n"


def row_line(r: dict) -> str:
    if "not_run" in r:
        return f"| {r['row']} | not run: {r['not_run']} | | | | | |"
    return (
        f"| {r['row']} | {r['img_per_s']:,.0f} | {r['speedup']:.2f}x | {r['loader']} | {', '.join(r['teachers'])} "
        f"| {', '.join(r['heads'])} | {r['fused_loss']} |"
    )


def plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    modes = result["modes"]
    ax.bar(list(modes), [f["data_wait_ms"] for f in modes.values()], label="data wait")
    ax.bar(
        list(modes),
        [f["compute_ms"] for f in modes.values()],
        bottom=[f["data_wait_ms"] for f in modes.values()],
        label="compute",
    )
    ax.set_ylabel("ms per step")
    ax.set_title(f"time per step, {result['env']['device_name']}")
    ax.legend()
    fig.tight_layout()
    paths.append(stem.parent / f"{stem.name}-phases.png")
    fig.savefig(paths[-1], dpi=120)
    if result.get("ablation"):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        rows = [r for r in result["ablation"] if "not_run" not in r]
        ax.bar([r["row"] for r in rows], [r["img_per_s"] for r in rows])
        for i, r in enumerate(rows):
            ax.annotate(f"{r['speedup']:.2f}x", (i, r["img_per_s"]), ha="center", va="bottom")
        ax.set_ylabel("img/s (e2e)")
        ax.set_title(f"ablation, {result['env']['device_name']}")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        paths.append(stem.parent / f"{stem.name}-ablation.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastreg-bench-") as tmp:
        work = Path(tmp)
        cfg = compose_config(overrides, work / "config")
        _, _, device = setup_distributed(cfg.trainer.device)
        result = {
            "env": environment(device),
            "config": dataclasses.asdict(cfg),
            "overrides": overrides,
            "bench": {"steps": args.steps, "warmup": args.warmup, "window": args.window},
            "modes": {mode: run_mode(mode, overrides, args, work) for mode in args.modes},
        }
        if "e2e" in result["modes"] and "compute" in result["modes"]:
            result["e2e_over_compute"] = result["modes"]["e2e"]["img_per_s"] / result["modes"]["compute"]["img_per_s"]
            result["limit"] = data_limit(result["modes"]["e2e"], result["modes"]["compute"])
            result["img_per_s_per_device"] = result["modes"]["e2e"]["img_per_s"]  # one process, one device
        if args.ablate:
            result["ablation"] = ablation(overrides, args, work, device)
        if args.step_variants:
            result["step_variants"] = step_variants(overrides, args, work, device)
        if args.distill_modes:
            result["distill_modes"], result["cache_write"] = distill_modes(overrides, args, work, device)
    # one file per kind of run: a call that runs the ablation and the step variants separately keeps both
    tag = "-".join(
        [
            *(args.modes if args.modes != list(MODES) else []),
            *(["ablate"] if args.ablate else []),
            *(["step-variants"] if args.step_variants else []),
            *(["distill-modes"] if args.distill_modes else []),
        ]
    )
    stem = result_stem(args.out, result["env"], tag)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md"), *plots(result, stem)]
    print(markdown(result))
    print("wrote", ", ".join(map(str, written)))
    return result


if __name__ == "__main__":
    main()
