"""Kernel benchmark: fastreg.kernels' fused normalized-regression loss and FusedMLPHead against eager PyTorch
and torch.compile of the eager code, on one GPU.

For each shape, dtype and each of forward, backward and forward+backward: the median time of
`triton.testing.do_bench` and the peak memory. For the loss also its achieved bandwidth as a share of the
device-to-device copy bandwidth measured in the same run: it must at least read pred and target and write
d pred, 3 B D itemsize bytes for forward+backward (the fused forward does all three; its backward only scales).
The head runs SimReg's simreg4 layout d -> 2d -> d -> 2d -> D in training mode, fp32 or under bf16 autocast
with fp32 parameters, as in training.

    python -m benchmarks.kernels --out benchmarks/results        # writes kernels_<gpu>_<date>.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fastreg.checkpoint import git_commit
from fastreg.config import HeadConfig
from fastreg.heads import build_head
from fastreg.kernels import FusedMLPHead, normalized_regression_loss

BATCHES = (256, 1024, 4096, 16384)
DIMS = (128, 2048, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD_SHAPES = ((256, 512, 2048), (1024, 512, 2048), (256, 2048, 2048), (1024, 2048, 2048))  # (B, d, D)
MODES = ("fwd", "bwd", "fwd+bwd")


def eager_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fastreg's eager SimReg loss, in fp32 like the kernel."""
    return (F.normalize(pred.float(), dim=1) - F.normalize(target.float(), dim=1)).pow(2).sum(1).mean()


IMPLS: dict[str, Callable] = {
    "triton": normalized_regression_loss,
    "eager": eager_loss,
    "compile": torch.compile(eager_loss, dynamic=False),  # one specialized graph per shape, as a trainer gets
}


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer: the memory roofline of this GPU."""
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def measure(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before) of one mode: fwd (no grad), bwd (on a kept graph)
    or fwd+bwd; forward() returns a tensor whose sum is the loss, leaves get their .grad reset between runs."""
    from triton.testing import do_bench

    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
    elif mode == "bwd":
        loss = forward().sum()

        def run():
            loss.backward(retain_graph=True)
    else:
        def run():
            forward().sum().backward()
    run()  # compile, allocate
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(run, grad_to_none=leaves)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


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
                        ms, mib = measure(lambda: impl(pred, target), [pred], mode)
                        gbs = floor_bytes / ms / 1e6 if mode == "fwd+bwd" else None
                        rows.append({"op": "normalized_regression", "impl": name, "mode": mode, "dtype": dtype_name,
                                     "B": batch, "D": dim, "ms": ms, "peak_mib": mib, "GBps": gbs,
                                     "copy_share": gbs / copy_gbs if gbs else None})
                        print(f"loss {dtype_name} B={batch:>5} D={dim:>4} {mode:>7} {name:>7}: {ms:.4f} ms, "
                              f"{mib:.1f} MiB" + (f", {gbs:.0f} GB/s ({gbs / copy_gbs:.0%} of copy)" if gbs else ""))
    return rows


def heads(d: int, D: int) -> dict[str, torch.nn.Module]:
    """simreg4 as fastreg builds it, eager; the same modules fused; and the eager one under torch.compile."""
    eager = build_head(HeadConfig(kind="simreg4", impl="eager"), d, D).cuda()
    return {"triton": FusedMLPHead(*copy.deepcopy(eager)), "eager": eager,
            "compile": torch.compile(copy.deepcopy(eager), dynamic=False)}


def head_rows() -> list[dict]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
        for batch, d, D in HEAD_SHAPES:
            x = torch.randn(batch, d, device="cuda", requires_grad=True)
            for name, head in heads(d, D).items():
                for mode in MODES:
                    def forward():
                        with autocast:
                            return head(x)
                    ms, mib = measure(forward, [x, *head.parameters()], mode)
                    rows.append({"op": "mlp_head", "impl": name, "mode": mode, "dtype": dtype_name, "B": batch,
                                 "d": d, "D": D, "ms": ms, "peak_mib": mib})
                    print(f"head {dtype_name} B={batch:>5} {d}->{2 * d}->{d}->{2 * d}->{D} {mode:>7} {name:>7}: "
                          f"{ms:.4f} ms, {mib:.1f} MiB")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# fastreg.kernels on {meta['gpu']} ({meta['date']}, commit {meta['commit']})", "",
             f"Device-to-device copy: {meta['copy_GBps']:.0f} GB/s. fwd+bwd, median ms of triton.testing.do_bench.", "",
             "## Normalized-regression loss", "",
             "| dtype | B | D | triton ms | eager ms | compile ms | vs eager | vs compile | triton GB/s | % of copy |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    both = {(r["dtype"], r["B"], r["D"], r["impl"]): r for r in rows
            if r["mode"] == "fwd+bwd" and r["op"] == "normalized_regression"}
    for dtype in DTYPES:
        for batch in BATCHES:
            for dim in DIMS:
                t, e, c = (both[(dtype, batch, dim, impl)] for impl in ("triton", "eager", "compile"))
                lines.append(f"| {dtype} | {batch} | {dim} | {t['ms']:.4f} | {e['ms']:.4f} | {c['ms']:.4f} | "
                             f"{e['ms'] / t['ms']:.2f}x | {c['ms'] / t['ms']:.2f}x | {t['GBps']:.0f} | "
                             f"{t['copy_share']:.0%} |")
    lines += ["", "## FusedMLPHead, simreg4 d -> 2d -> d -> 2d -> D, training mode", "",
              "fwd+bwd median ms; peak MiB above the inputs.", "",
              "| dtype | B | d | D | triton ms | eager ms | compile ms | vs eager | vs compile | triton MiB | eager MiB |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    head = {(r["dtype"], r["B"], r["d"], r["D"], r["impl"]): r for r in rows
            if r["mode"] == "fwd+bwd" and r["op"] == "mlp_head"}
    for dtype in DTYPES:
        for shape in HEAD_SHAPES:
            t, e, c = (head[(dtype, *shape, impl)] for impl in ("triton", "eager", "compile"))
            lines.append(f"| {dtype} | {' | '.join(map(str, shape))} | {t['ms']:.4f} | {e['ms']:.4f} | {c['ms']:.4f} | "
                         f"{e['ms'] / t['ms']:.2f}x | {c['ms'] / t['ms']:.2f}x | {t['peak_mib']:.0f} | "
                         f"{e['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES) + 1, figsize=(17, 4))
    for ax, dtype in zip(axes, DTYPES):
        for impl in IMPLS:
            pts = sorted((r["B"] * r["D"], r["GBps"]) for r in rows if r["op"] == "normalized_regression"
                         and r["mode"] == "fwd+bwd" and r["dtype"] == dtype and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"loss fwd+bwd, {dtype}")
        ax.set_xlabel("B x D")
    axes[0].set_ylabel("GB/s (3 B D itemsize / time)")
    axes[0].legend()
    head_plot(axes[-1], [r for r in rows if r["op"] == "mlp_head" and r["mode"] == "fwd+bwd"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def head_plot(ax, rows: list[dict]) -> None:
    """Speed-up of triton and compile over eager per head shape and dtype, as bars."""
    cases = [(dtype, shape) for dtype in DTYPES for shape in HEAD_SHAPES]
    ms = {(r["dtype"], (r["B"], r["d"], r["D"]), r["impl"]): r["ms"] for r in rows}
    for i, impl in enumerate(("triton", "compile")):
        ax.bar([c + 0.4 * i for c in range(len(cases))], [ms[(*case, "eager")] / ms[(*case, impl)] for case in cases],
               width=0.4, label=impl)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([c + 0.2 for c in range(len(cases))], [f"{dt} B{b}\n{d}->{D}" for dt, (b, d, D) in cases],
                  fontsize=7)
    ax.set_title("simreg4 head fwd+bwd")
    ax.set_ylabel("speed-up over eager")
    ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels measures GPU kernels: no CUDA device here")
    torch._dynamo.config.cache_size_limit = 256  # every (shape, dtype, mode) gets its own compiled graph
    meta = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "commit": git_commit()[:12], "torch": torch.__version__, "copy_GBps": copy_bandwidth()}
    rows = loss_rows(meta["copy_GBps"]) + head_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{meta['gpu'].replace(' ', '_')}_{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
