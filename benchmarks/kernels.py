"""Kernel benchmark: fastreg.kernels' fused normalized-regression loss against eager PyTorch and
torch.compile of the eager loss, on one GPU.

For each (B, D, dtype) and each of forward, backward and forward+backward: the median time of
`triton.testing.do_bench`, the peak memory, and for the loss its achieved bandwidth as a share of the
device-to-device copy bandwidth measured in the same run. The loss must at least read pred and target
and write d pred: 3 B D itemsize bytes for forward+backward (the fused forward does all three; its
backward only scales).

    python benchmarks/kernels.py --out benchmarks/results        # writes kernels_<gpu>_<date>.{json,md,png}
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fastreg.checkpoint import git_commit
from fastreg.kernels import normalized_regression_loss

BATCHES = (256, 1024, 4096, 16384)
DIMS = (128, 2048, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def measure(impl: Callable, batch: int, dim: int, dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """(median ms, peak MiB above the inputs) of one mode: fwd, bwd (on a kept graph) or fwd+bwd."""
    from triton.testing import do_bench

    pred = torch.randn(batch, dim, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randn(batch, dim, device="cuda", dtype=dtype)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                impl(pred, target)
    elif mode == "bwd":
        loss = impl(pred, target)

        def run():
            loss.backward(retain_graph=True)
    else:
        def run():
            impl(pred, target).backward()
    run()  # compile, autotune, allocate
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(run, grad_to_none=[pred])
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def run_all(copy_gbs: float) -> list[dict]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for batch in BATCHES:
            for dim in DIMS:
                floor_bytes = 3 * batch * dim * dtype.itemsize  # read pred, target; write d pred
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    for name, impl in IMPLS.items():
                        ms, mib = measure(impl, batch, dim, dtype, mode)
                        gbs = floor_bytes / ms / 1e6 if mode == "fwd+bwd" else None
                        rows.append({"op": "normalized_regression", "impl": name, "mode": mode, "dtype": dtype_name,
                                     "B": batch, "D": dim, "ms": ms, "peak_mib": mib, "GBps": gbs,
                                     "copy_share": gbs / copy_gbs if gbs else None})
                        print(f"{dtype_name} B={batch:>5} D={dim:>4} {mode:>7} {name:>7}: {ms:.4f} ms, {mib:.1f} MiB"
                              + (f", {gbs:.0f} GB/s ({gbs / copy_gbs:.0%} of copy)" if gbs else ""))
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Fused normalized-regression loss on {meta['gpu']} ({meta['date']}, commit {meta['commit']})", "",
             f"Device-to-device copy: {meta['copy_GBps']:.0f} GB/s. fwd+bwd, median ms of triton.testing.do_bench.", "",
             "| dtype | B | D | triton ms | eager ms | compile ms | vs eager | vs compile | triton GB/s | % of copy |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    both = {(r["dtype"], r["B"], r["D"], r["impl"]): r for r in rows if r["mode"] == "fwd+bwd"}
    for dtype in DTYPES:
        for batch in BATCHES:
            for dim in DIMS:
                t, e, c = (both[(dtype, batch, dim, impl)] for impl in ("triton", "eager", "compile"))
                lines.append(f"| {dtype} | {batch} | {dim} | {t['ms']:.4f} | {e['ms']:.4f} | {c['ms']:.4f} | "
                             f"{e['ms'] / t['ms']:.2f}x | {c['ms'] / t['ms']:.2f}x | {t['GBps']:.0f} | "
                             f"{t['copy_share']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES), figsize=(12, 4), sharey=True)
    for ax, dtype in zip(axes, DTYPES):
        for impl in IMPLS:
            pts = sorted((r["B"] * r["D"], r["GBps"]) for r in rows
                         if r["mode"] == "fwd+bwd" and r["dtype"] == dtype and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"loss fwd+bwd, {dtype}")
        ax.set_xlabel("B x D")
    axes[0].set_ylabel("GB/s (3 B D itemsize / time)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py measures GPU kernels: no CUDA device here")
    torch._dynamo.config.cache_size_limit = 256  # every (shape, dtype, mode) gets its own compiled graph
    meta = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "commit": git_commit()[:12], "torch": torch.__version__, "copy_GBps": copy_bandwidth()}
    rows = run_all(meta["copy_GBps"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{meta['gpu'].replace(' ', '_')}_{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
