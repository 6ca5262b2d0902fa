"""A torch.profiler trace of a few end-to-end training steps, and where their time goes, phase by phase.

    python -m benchmarks.profile [--steps 5] [--warmup 10] [--out DIR] experiment=simreg_r50_r18 data.root=...

The overrides are the training config's, as for benchmarks.throughput. The phases are fastreg.monitor.PHASES,
the ranges that the trainer and the Distiller mark (as torch.profiler ranges and NVTX ranges, so nsys shows
them too). Every op is given to the phase range it ran in (its own thread's enclosing range, else the range
whose time span holds its start: autograd runs the backward on its own thread). On a GPU a phase's time is
the device time of the kernels its ops launched; on CPU the self time of its ops.

Writes <out>/<gpu or cpu>/<date>-<commit>-trace.json (chrome://tracing or ui.perfetto.dev),
<date>-<commit>-profile.md (ms per step per phase and each phase's top kernels; CPU: ops), -profile.json (the same
figures) and -profile.png (ms per step per phase as bars).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.data_throughput import batch_stream
from benchmarks.throughput import compose_config, environment, result_stem
from fastreg.monitor import PHASES, data_phase
from fastreg.trainer import Trainer

TOP = 5  # kernels listed per phase


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before profiling: compile, autotune, caches")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if o.startswith("-") or "=" not in o]:
        parser.error(f"unknown flag(s) {bad}: after the flags come training overrides, key=value")
    return args, overrides


def profile_steps(trainer: Trainer, args: argparse.Namespace) -> profile:
    batches = data_phase(batch_stream(trainer.loader))  # each fetch is the "data" phase
    trainer.distiller.train()
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step(next(batches))
        if cuda:
            torch.cuda.synchronize()
    return prof


def phase_of(event, spans: list[tuple[str, float, float]]) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PHASES:
            return parent.name
        parent = parent.cpu_parent
    start = event.time_range.start
    return next((name for name, s, e in spans if s <= start <= e), "other")


def by_phase(prof: profile, cuda: bool) -> dict[str, dict[str, float]]:
    """{phase: {kernel or op name: total µs}} over the profiled steps."""
    events = [e for e in prof.events() if not e.name.startswith("ProfilerStep")]
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in PHASES]
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event.name in PHASES:
            continue
        phase = phase_of(event, spans)
        if cuda:
            for kernel in event.kernels:
                table[phase][kernel.name] += kernel.duration
        elif event.self_cpu_time_total > 0:
            table[phase][event.name] += event.self_cpu_time_total
    return table


def per_step(table: dict[str, dict[str, float]], steps: int) -> dict[str, dict]:
    """{phase: {"ms": ms per step, "top": [(kernel or op, ms per step), ...]}}, phases in PHASES order."""
    phases = {}
    for phase in [*PHASES, "other"]:
        if phase in table:
            items = sorted(table[phase].items(), key=lambda kv: -kv[1])
            phases[phase] = {
                "ms": sum(us for _, us in items) / steps / 1e3,
                "top": [(name, us / steps / 1e3) for name, us in items[:TOP]],
            }
    return phases


def markdown(phases: dict[str, dict], steps: int, env: dict, cuda: bool) -> str:
    total = sum(p["ms"] for p in phases.values()) or 1.0
    what = "device time of the kernels it launched" if cuda else "self CPU time of its ops"
    lines = [
        f"# Profile of {steps} e2e steps on {env['device_name']} ({env['date']}, commit {env['commit'][:12]})",
        "",
        f"Per phase: the {what}, ms per step.",
        "",
        f"| phase | ms/step | share | top {'kernels' if cuda else 'ops'} (ms/step) |",
        "|---|--:|--:|---|",
    ]
    for phase, p in phases.items():
        top = "; ".join(f"`{name[:60]}` {ms:.3f}" for name, ms in p["top"])
        lines.append(f"| {phase} | {p['ms']:.3f} | {p['ms'] / total:.0%} | {top} |")
    return "\n".join(lines) + "\n"


def plot(phases: dict[str, dict], env: dict, cuda: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(phases)
    ax.barh(names, [p["ms"] for p in phases.values()])
    ax.invert_yaxis()  # the step's order, top to bottom
    ax.set_xlabel("ms per step (" + ("GPU kernel time" if cuda else "CPU op self time") + ")")
    ax.set_title(f"time by phase, {env['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args, overrides = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastreg-profile-") as tmp:
        trainer = Trainer(compose_config(overrides, Path(tmp)))
        prof = profile_steps(trainer, args)
    cuda = trainer.device.type == "cuda"
    env = environment(trainer.device)
    stem = result_stem(args.out, env)
    stem.parent.mkdir(parents=True, exist_ok=True)
    trace, report = stem.parent / f"{stem.name}-trace.json", stem.parent / f"{stem.name}-profile"
    prof.export_chrome_trace(str(trace))
    phases = per_step(by_phase(prof, cuda), args.steps)
    text = markdown(phases, args.steps, env, cuda)
    report.with_suffix(".md").write_text(text)
    report.with_suffix(".json").write_text(
        json.dumps({"env": env, "overrides": overrides, "steps": args.steps, "phases": phases}, indent=1)
    )
    plot(phases, env, cuda, report.with_suffix(".png"))
    print(text)
    print("wrote", trace, "and", ", ".join(str(report.with_suffix(s)) for s in (".md", ".json", ".png")))
    return phases


if __name__ == "__main__":
    main()
