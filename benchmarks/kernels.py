"""Kernel benchmark: fastreg.kernels' fused normalized-regression loss and FusedMLPHead against eager PyTorch
and torch.compile of the eager code (`dynamic=False`), on one GPU.

For each implementation (triton, eager, compile), shape, dtype and mode (fwd without grad, fwd+bwd), two
times, because a call can be bound by either the GPU or the CPU that issues it:

- device time ("ms"): `triton.testing.do_bench_cudagraph`, median ms per call of a CUDA graph of unrolled
  calls (gradients reset to None before each, as a training step's zero_grad does). Replay launches no
  Python, so this is the GPU's time alone. No L2 flush between calls: shapes below the L2 size partly hit it.
- host time per call ("host_ms"): the CPU time to issue one call while the GPU cannot run it. The stream is
  put to sleep (`torch.cuda._sleep`), then HOST_CALLS calls are issued and timed with `time.perf_counter()`
  before any synchronize (gradients reset included); the median over HOST_REPEATS such batches. An event
  recorded after the sleep tells whether the GPU was still asleep when the last call had been issued
  ("host_covered"); if not, once more with a longer sleep, and if still not, host_covered is false.
  A call costs max(device, host) in a loop that does not sync: host > device means host-bound.

"bwd" alone (the backward of a retained graph, repeated) is not measured any more: its forward would run
before and outside the capture, on another stream than the capture's (do_bench_cudagraph warms up on a side
stream, torch.cuda.graph captures on its own), and autograd runs each backward op on its forward's stream, so
the capture would have to pull in a stream that ran outside it. No training step runs a backward apart from
its forward either: fwd+bwd is the training step, fwd (no grad) inference.

Also the peak memory of one call (MiB above what was allocated before it, gradients included) and, for the
loss's fwd+bwd, GB/s as 3 B D itemsize / device time (read pred and target, write d pred: the floor; the
fused forward does all three, its backward only scales) and that as a share of the device-to-device copy
bandwidth measured the same way in the same run. The head is SimReg's simreg4 d -> 2d -> d -> 2d -> D in
training mode, fp32 or under bf16 autocast over fp32 parameters, as in training: all three CUDA-graph
replayed. The markdown starts with the targets (LOSS_TARGETS, HEAD_TARGETS), met or not, and the JSON's "head_wins" says for each
(gpu, dtype, head shape) whether the fused head's fwd+bwd device time beats eager's (head.impl=auto's evidence).

    python -m benchmarks.kernels --out benchmarks/results        # writes kernels_<gpu>_<date>.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastreg.checkpoint import git_commit
from fastreg.config import HeadConfig
from fastreg.heads import build_head
from fastreg.kernels import FusedMLPHead, normalized_regression_loss

BATCHES = (256, 4096, 16384)
DIMS = (128, 2048)  # B x D = 4096 x 2048 (2^23) and 16384 x 2048 (2^25) are the targets' sizes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD_SHAPES = ((256, 512, 2048), (1024, 2048, 2048))  # (B, d, D)
MODES = ("fwd", "fwd+bwd")
HOST_CALLS = 10  # calls per timed batch: a few hundred launches at most, so a full launch queue does not block
HOST_REPEATS = 3
SLEEP_MS = 50.0  # the first sleep in front of a timed batch


class Target(NamedTuple):
    what: str
    value: Callable[[dict[str, dict]], float]  # of one case's {impl: fwd+bwd row}
    threshold: float
    fmt: str
    strict: bool = False  # value > threshold, else >=

    def met(self, value: float) -> bool:
        return value > self.threshold if self.strict else value >= self.threshold


LOSS_TARGET_ELEMENTS = 2**22  # B x D from which the loss targets apply
LOSS_TARGETS = (
    Target("device time >= 85% of copy bandwidth", lambda i: i["triton"]["copy_share"], 0.85, "{:.0%}"),
    Target("device time >= 3x eager", lambda i: i["eager"]["ms"] / i["triton"]["ms"], 3.0, "{:.2f}x"),
    Target("device time >= 1.25x torch.compile", lambda i: i["compile"]["ms"] / i["triton"]["ms"], 1.25, "{:.2f}x"),
    Target(
        "host time per call below eager's",
        lambda i: i["eager"]["host_ms"] / i["triton"]["host_ms"],
        1.0,
        "eager's / triton's = {:.2f}",
        strict=True,
    ),
)
HEAD_TARGET_DTYPE = "bf16"
HEAD_TARGETS = (
    Target("device time >= 1.3x eager", lambda i: i["eager"]["ms"] / i["triton"]["ms"], 1.3, "{:.2f}x"),
    Target("device time >= 1.1x torch.compile", lambda i: i["compile"]["ms"] / i["triton"]["ms"], 1.1, "{:.2f}x"),
)


def eager_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fastreg's eager SimReg loss, in fp32 like the kernel."""
    return (F.normalize(pred.float(), dim=1) - F.normalize(target.float(), dim=1)).pow(2).sum(1).mean()


IMPLS: dict[str, Callable] = {
    "triton": normalized_regression_loss,
    "eager": eager_loss,
    "compile": torch.compile(eager_loss, dynamic=False),  # one specialized graph per shape, as a trainer gets
}
IMPL_NAMES = tuple(IMPLS)  # the head's too


def device_ms(run: Callable[[], object], leaves: list[torch.Tensor] | None = None) -> float:
    """Median ms per call of run() replayed in a CUDA graph (triton.testing.do_bench_cudagraph)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(run, grad_to_none=leaves, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer: the memory roofline of this GPU."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / device_ms(lambda: dst.copy_(src)) / 1e6


@functools.cache
def sleep_cycles_per_ms() -> float:
    """GPU clock cycles that torch.cuda._sleep spins per ms on this device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10**6)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return 10**7 / start.elapsed_time(end)


def issue_ms(run: Callable[[], object], leaves: list[torch.Tensor], sleep_ms: float) -> tuple[float, bool]:
    """(CPU ms per call to issue HOST_CALLS calls behind a sleep of sleep_ms, whether the GPU still slept after)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(sleep_ms * sleep_cycles_per_ms()))
    awake = torch.cuda.Event()
    awake.record()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        for leaf in leaves:
            leaf.grad = None
        run()
    ms = (time.perf_counter() - start) * 1e3 / HOST_CALLS
    covered = not awake.query()
    torch.cuda.synchronize()
    return ms, covered


def host_ms(run: Callable[[], object], leaves: list[torch.Tensor]) -> tuple[float, bool]:
    """(median of HOST_REPEATS issue_ms, whether the sleep covered every batch), a batch the sleep did not
    cover retried once with a sleep 4x as long as its calls took (at least twice the previous sleep)."""
    times, covered, sleep_ms = [], True, SLEEP_MS
    for _ in range(HOST_REPEATS):
        ms, ok = issue_ms(run, leaves, sleep_ms)
        if not ok:
            sleep_ms = max(4 * ms * HOST_CALLS, 2 * sleep_ms)
            ms, ok = issue_ms(run, leaves, sleep_ms)
        times.append(ms)
        covered &= ok
    return statistics.median(times), covered


def peak_mib(run: Callable[[], object], leaves: list[torch.Tensor]) -> float:
    """MiB allocated at the peak of one call above what was allocated before it (gradients reset first)."""
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def runner(forward: Callable[[], torch.Tensor], mode: str) -> Callable[[], None]:
    """One call of mode: fwd under no_grad, or fwd+bwd (forward().sum().backward()). No host sync in either."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                forward()
    else:

        def run():
            forward().sum().backward()

    return run


def measure(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> dict:
    """{ms (device), host_ms, host_covered, peak_mib} of one mode; leaves' .grad is reset before each call.
    A failure (a capture that does not work, out of memory) gives None figures and "error", so the rest runs."""
    run = runner(forward, mode)
    try:
        run()  # compile, allocate
        peak = peak_mib(run, leaves)
        host, covered = host_ms(run, leaves)
        ms = device_ms(run, leaves)
    except Exception as e:  # noqa: BLE001 - report it in the row and measure the next case
        return {
            "ms": None,
            "host_ms": None,
            "host_covered": None,
            "peak_mib": None,
            "error": f"{type(e).__name__}: {e}"[:500],
        }
    return {"ms": ms, "host_ms": host, "host_covered": covered, "peak_mib": peak}


def say(label: str, row: dict) -> None:
    if row["ms"] is None:
        print(f"{label}: FAILED {row['error']}")
        return
    print(
        f"{label}: device {row['ms']:.4f} ms, host {row['host_ms']:.4f} ms/call"
        f"{'' if row['host_covered'] else ' (sleep did not cover)'}, {row['peak_mib']:.1f} MiB"
        + (f", {row['GBps']:.0f} GB/s ({row['copy_share']:.0%} of copy)" if row.get("GBps") else "")
    )


def loss_rows(copy_gbs: float) -> list[dict]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for batch in BATCHES:
            for dim in DIMS:
                pred = torch.randn(batch, dim, device="cuda", dtype=dtype, requires_grad=True)
                target = torch.randn(batch, dim, device="cuda", dtype=dtype)
                floor_bytes = 3 * batch * dim * dtype.itemsize  # read pred, target; write d pred
                for mode in MODES:
                    for name, impl in IMPLS.items():
                        row = {
                            "op": "normalized_regression",
                            "impl": name,
                            "mode": mode,
                            "dtype": dtype_name,
                            "B": batch,
                            "D": dim,
                            **measure(lambda impl=impl, pred=pred, target=target: impl(pred, target), [pred], mode),
                        }
                        gbs = floor_bytes / row["ms"] / 1e6 if mode == "fwd+bwd" and row["ms"] else None
                        row.update(GBps=gbs, copy_share=gbs / copy_gbs if gbs else None)
                        rows.append(row)
                        say(f"loss {dtype_name} B={batch:>5} D={dim:>4} {mode:>7} {name:>7}", row)
    return rows


def heads(d: int, D: int) -> dict[str, torch.nn.Module]:
    """simreg4 as fastreg builds it, eager; the same modules fused; and the eager one under torch.compile."""
    eager = build_head(HeadConfig(kind="simreg4", impl="eager"), d, D).cuda()
    return {
        "triton": FusedMLPHead(*copy.deepcopy(eager)),
        "eager": eager,
        "compile": torch.compile(copy.deepcopy(eager), dynamic=False),
    }


def head_rows() -> list[dict]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        # no autocast cache: casts made in a capture must not outlive it (and each weight is cast once anyway)
        autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
        for batch, d, D in HEAD_SHAPES:
            x = torch.randn(batch, d, device="cuda", requires_grad=True)
            for name, head in heads(d, D).items():
                for mode in MODES:

                    def forward(head=head, x=x, autocast=autocast):
                        with autocast:
                            return head(x)

                    row = {
                        "op": "mlp_head",
                        "impl": name,
                        "mode": mode,
                        "dtype": dtype_name,
                        "B": batch,
                        "d": d,
                        "D": D,
                        **measure(forward, [x, *head.parameters()], mode),
                    }
                    rows.append(row)
                    say(f"head {dtype_name} B={batch:>5} {d}->{2 * d}->{d}->{2 * d}->{D} {mode:>7} {name:>7}", row)
    return rows


def by_impl(rows: list[dict], op: str, keys: tuple[str, ...]) -> dict[tuple, dict[str, dict]]:
    """fwd+bwd rows of op that have figures, {(key values...): {impl: row}}."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["op"] == op and r["mode"] == "fwd+bwd" and r["ms"] is not None:
            cases.setdefault(tuple(r[k] for k in keys), {})[r["impl"]] = r
    return cases


def speedup(impls: dict[str, dict], other: str) -> float | None:
    """triton's device-time speed-up over other in one case {impl: row}, None where either was not measured."""
    return impls[other]["ms"] / impls["triton"]["ms"] if {other, "triton"} <= impls.keys() else None


def head_wins(rows: list[dict], gpu: str) -> list[dict]:
    """For every (dtype, head shape) of the grid: whether the fused head's fwd+bwd device time, CUDA-graph
    replayed, beats eager's ("faster"; false where either failed), with the speed-ups over eager and compile."""
    head = by_impl(rows, "mlp_head", ("dtype", "B", "d", "D"))
    entries = []
    for dtype in DTYPES:
        for B, d, D in HEAD_SHAPES:
            impls = head.get((dtype, B, d, D), {})
            vs_eager = speedup(impls, "eager")
            entries.append(
                {
                    "gpu": gpu,
                    "dtype": dtype,
                    "B": B,
                    "d": d,
                    "D": D,
                    "speedup_vs_eager": vs_eager,
                    "speedup_vs_compile": speedup(impls, "compile"),
                    "faster": vs_eager is not None and vs_eager > 1.0,
                }
            )
    return entries


def cells(impls: dict[str, dict], key: str, fmt: str) -> list[str]:
    """key of triton, eager and compile formatted, '-' where not measured."""
    return [fmt.format(impls[i][key]) if i in impls else "-" for i in IMPL_NAMES]


def ratios(impls: dict[str, dict]) -> list[str]:
    """triton's device-time speed-up over eager and over compile."""
    return ["-" if (x := speedup(impls, i)) is None else f"{x:.2f}x" for i in ("eager", "compile")]


def host_cells(impls: dict[str, dict]) -> list[str]:
    """Host ms per call of triton, eager and compile ('*': the sleep did not cover it); triton's bound."""
    host = [
        f"{impls[i]['host_ms']:.4f}{'' if impls[i]['host_covered'] else '*'}" if i in impls else "-" for i in IMPL_NAMES
    ]
    t = impls.get("triton")
    return host + ["-" if t is None else "host" if t["host_ms"] > t["ms"] else "device"]


def loss_table(rows: list[dict]) -> list[str]:
    lines = [
        "| dtype | B | D | triton ms | eager ms | compile ms | vs eager | vs compile | triton GB/s | % of copy "
        "| triton host ms | eager host ms | compile host ms | triton bound |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for (dtype, B, D), impls in by_impl(rows, "normalized_regression", ("dtype", "B", "D")).items():
        t = impls.get("triton")
        bandwidth = [f"{t['GBps']:.0f}", f"{t['copy_share']:.0%}"] if t else ["-", "-"]
        lines.append(
            "| "
            + " | ".join(
                [dtype, str(B), str(D), *cells(impls, "ms", "{:.4f}"), *ratios(impls), *bandwidth, *host_cells(impls)]
            )
            + " |"
        )
    return lines


def head_table(rows: list[dict]) -> list[str]:
    lines = [
        "| dtype | B | d | D | triton ms | eager ms | compile ms | vs eager | vs compile | triton host ms "
        "| eager host ms | compile host ms | triton bound | triton MiB | eager MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for (dtype, B, d, D), impls in by_impl(rows, "mlp_head", ("dtype", "B", "d", "D")).items():
        mib = cells(impls, "peak_mib", "{:.0f}")[:2]
        lines.append(
            "| "
            + " | ".join(
                [dtype, str(B), str(d), str(D), *cells(impls, "ms", "{:.4f}"), *ratios(impls), *host_cells(impls), *mib]
            )
            + " |"
        )
    return lines


def target_line(what: str, target: Target, cases: dict[str, dict[str, dict]]) -> str:
    """One row of the targets table: the worst case of cases {label: {impl: row}}, met where every case meets it,
    "not measured" where any case lacks the figures of an implementation it compares."""
    try:
        values = {label: target.value(impls) for label, impls in cases.items()}
    except KeyError:  # an implementation failed there
        values = {}
    if not values:
        return f"| {what} | {target.what} | - | not measured |"
    label, worst = min(values.items(), key=lambda kv: kv[1])
    return (
        f"| {what} | {target.what} | {target.fmt.format(worst)} ({label}) | "
        f"{'met' if all(target.met(v) for v in values.values()) else 'not met'} |"
    )


def targets(rows: list[dict]) -> list[str]:
    lines = ["| case | target | worst measured | status |", "|---|---|---|---|"]
    loss = by_impl(rows, "normalized_regression", ("dtype", "B", "D"))
    for dtype in DTYPES:  # every grid shape from 2^22 elements on: one not measured leaves the target unjudged
        cases = {
            f"B {B}, D {D}": loss.get((dtype, B, D), {}) for B in BATCHES for D in DIMS if B * D >= LOSS_TARGET_ELEMENTS
        }
        case = f"loss fwd+bwd {dtype}, B x D >= 2^{LOSS_TARGET_ELEMENTS.bit_length() - 1}"
        lines += [target_line(case, t, cases) for t in LOSS_TARGETS]
    head = by_impl(rows, "mlp_head", ("dtype", "B", "d", "D"))
    for B, d, D in HEAD_SHAPES:
        cases = {f"B {B}, d {d}, D {D}": head.get((HEAD_TARGET_DTYPE, B, d, D), {})}
        lines += [
            target_line(f"head fwd+bwd {HEAD_TARGET_DTYPE}, (B, d, D) = ({B}, {d}, {D})", t, cases)
            for t in HEAD_TARGETS
        ]
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    uncovered = sum(r["host_covered"] is False for r in rows if r["mode"] == "fwd+bwd")  # the tables' rows
    failed = [r for r in rows if r["ms"] is None]
    lines = [
        f"# fastreg.kernels on {meta['gpu']} ({meta['date']}, commit {meta['commit']})",
        "",
        f"Device-to-device copy: {meta['copy_GBps']:.0f} GB/s. fwd+bwd per call: device ms = median of "
        "triton.testing.do_bench_cudagraph (CUDA-graph replay, the GPU's time alone); host ms = CPU time to "
        f"issue one call while the GPU sleeps (median of {HOST_REPEATS} batches of {HOST_CALLS} calls). "
        '"triton bound": host where its host time exceeds its device time.',
        "",
        "## Targets",
        "",
        'Met where every case meets it; "worst measured" is the case furthest from it.',
        "",
        *targets(rows),
        "",
        "## Normalized-regression loss",
        "",
        *loss_table(rows),
        "",
        "## FusedMLPHead, simreg4 d -> 2d -> d -> 2d -> D, training mode",
        "",
        "All three CUDA-graph replayed; fp32, or bf16 autocast over fp32 parameters. Peak MiB of one call "
        "above the inputs and parameters.",
        "",
        *head_table(rows),
    ]
    if uncovered:
        lines += [
            "",
            f"\\* {uncovered} host time(s) not covered by the sleep: the GPU woke before the last call "
            "was issued, so these may include waiting for it.",
        ]
    if failed:
        lines += ["", "## Failed measurements", ""] + [
            f"- {r['op']} {r['impl']} {r['mode']} {r['dtype']} "
            f"{', '.join(f'{k} {r[k]}' for k in ('B', 'd', 'D') if k in r)}: {r['error']}"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES) + 1, figsize=(17, 4))
    loss = by_impl(rows, "normalized_regression", ("dtype", "B", "D"))
    for ax, dtype in zip(axes, DTYPES):
        for impl in IMPL_NAMES:
            pts = sorted(
                (B * D, impls[impl]["GBps"]) for (dt, B, D), impls in loss.items() if dt == dtype and impl in impls
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"loss fwd+bwd, {dtype} (device time)")
        ax.set_xlabel("B x D")
    axes[0].set_ylabel("GB/s (3 B D itemsize / device time)")
    axes[0].legend()
    head_plot(axes[-1], by_impl(rows, "mlp_head", ("dtype", "B", "d", "D")))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def head_plot(ax, head: dict[tuple, dict[str, dict]]) -> None:
    """Device-time speed-up of triton and compile over eager per head dtype and shape, as bars."""
    cases = [case for case, impls in head.items() if set(IMPL_NAMES) <= impls.keys()]
    for i, impl in enumerate(("triton", "compile")):
        ax.bar(
            [c + 0.4 * i for c in range(len(cases))],
            [head[case]["eager"]["ms"] / head[case][impl]["ms"] for case in cases],
            width=0.4,
            label=impl,
        )
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([c + 0.2 for c in range(len(cases))], [f"{dt} B{b}\n{d}->{D}" for dt, b, d, D in cases], fontsize=7)
    ax.set_title("simreg4 head fwd+bwd, CUDA graphs")
    ax.set_ylabel("speed-up over eager")
    ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels measures GPU kernels: no CUDA device here")
    import triton

    torch._dynamo.config.cache_size_limit = 256  # every (shape, dtype, mode) gets its own compiled graph
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit()[:12],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device_time": "triton.testing.do_bench_cudagraph, median",
        "copy_GBps": copy_bandwidth(),
        "host_calls": HOST_CALLS,
        "host_repeats": HOST_REPEATS,
        "sleep_cycles_per_ms": sleep_cycles_per_ms(),
    }
    rows = loss_rows(meta["copy_GBps"]) + head_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{meta['gpu'].replace(' ', '_')}_{meta['date']}"
    result = {"meta": meta, "rows": rows, "head_wins": head_wins(rows, meta["gpu"])}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
