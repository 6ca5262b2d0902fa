"""A full distillation run on paper: hours for E epochs of ImageNet-1k on W GPUs, from a measured per-device e2e
throughput (the JSON that benchmarks.throughput writes).

    python -m benchmarks.scaling benchmarks/results/<device>/<date>-<commit>.json [--epochs 130] [--gpus 1 8]
        [--busbw-gbs 350]

Only the per-device img/s and the trainable parameter count come from the measurement; the rest is arithmetic on
stated assumptions (weak scaling: every rank keeps the per-device batch, so the global batch grows with W):
  t_step       = batch / (img/s)                        one rank's step, as measured on one device
  t_allreduce  = 2 (W - 1) / W * 4 P / busbw            ring all-reduce of P fp32 gradients (NCCL's "bus bandwidth")
  best         = t_step                                 DDP hides the all-reduce of its 25 MB buckets under backward
  worst        = t_step + t_allreduce                   none of it hidden
  hours        = epochs * 1,281,167 / (W * batch / step time) / 3600
Data scales with W only if each rank decodes its own shard as fast as on one device (DALI shards by rank; on a GPU
each device has its own hardware JPEG decoder, but the host's CPU cores and disk are shared by the ranks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's train split


def step_times(img_per_s: float, batch: int, params: int, gpus: int, busbw_gbs: float) -> tuple[float, float]:
    """(best, worst) seconds per step on `gpus` ranks of `batch` images each."""
    t_step = batch / img_per_s
    t_allreduce = 2 * (gpus - 1) / gpus * 4 * params / (busbw_gbs * 1e9)
    return t_step, t_step + t_allreduce


def hours(epochs: int, gpus: int, batch: int, seconds_per_step: float) -> float:
    return epochs * IMAGENET_TRAIN / (gpus * batch / seconds_per_step) / 3600


def table(result: dict, epochs: int, gpus: list[int], busbw_gbs: float) -> str:
    e2e = result["modes"]["e2e"]
    ips, batch, params = e2e["img_per_s"], result["config"]["data"]["batch_size"], e2e["trainable_params"]
    env = result["env"]
    lines = [
        f"{epochs} epochs of ImageNet-1k ({IMAGENET_TRAIN:,} images) from the e2e throughput measured on "
        f"{env['device_name']} ({env['date']}, commit {env['commit'][:12]}): {ips:,.0f} img/s per device at "
        f"batch {batch}; {params / 1e6:.2f} M trainable parameters, so {4 * params / 2**20:.1f} MiB of fp32 "
        f"gradients to all-reduce per step, at an assumed {busbw_gbs:g} GB/s bus bandwidth.",
        "",
        "| GPUs | global batch | img/s, linear | hours, linear | hours, all-reduce not hidden | efficiency, worst |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for w in gpus:
        best, worst = step_times(ips, batch, params, w, busbw_gbs)
        lines.append(
            f"| {w} | {w * batch:,} | {w * ips:,.0f} | {hours(epochs, w, batch, best):,.1f} | "
            f"{hours(epochs, w, batch, worst):,.1f} | {best / worst:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a JSON written by benchmarks.throughput (with an e2e mode)")
    parser.add_argument("--epochs", type=int, default=130, help="SimReg's recipe: 130")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--busbw-gbs",
        type=float,
        default=350.0,
        help="all-reduce bus bandwidth, GB/s: NVLink within an 8-GPU H100 node is in the hundreds "
        "(measure yours with nccl-tests' all_reduce_perf); 100 Gb/s between nodes is ~12",
    )
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    if "e2e" not in result.get("modes", {}) or "trainable_params" not in result["modes"]["e2e"]:
        parser.error(
            f"{args.result} has no e2e mode with trainable_params: run benchmarks.throughput with the e2e "
            "mode (its default) at this commit or later"
        )
    text = table(result, args.epochs, args.gpus, args.busbw_gbs)
    print(text)
    return text


if __name__ == "__main__":
    main()
