"""The benchmark reports build from their rows on CPU (the timings themselves need the GPU machine)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_report_tables_and_plot(tmp_path):
    kernels = load("kernels")
    rows = []
    for dtype in kernels.DTYPES:
        for mode in kernels.MODES:
            for i, impl in enumerate(kernels.IMPLS):  # triton 1 ms, eager 2 ms, compile 3 ms
                rows += [{"op": "normalized_regression", "impl": impl, "mode": mode, "dtype": dtype, "B": b, "D": d,
                          "ms": 1.0 + i, "peak_mib": 0.0, "GBps": 100.0, "copy_share": 0.5}
                         for b in kernels.BATCHES for d in kernels.DIMS]
                rows += [{"op": "mlp_head", "impl": impl, "mode": mode, "dtype": dtype, "B": b, "d": d, "D": D,
                          "ms": 1.0 + i, "peak_mib": 10.0} for b, d, D in kernels.HEAD_SHAPES]
    text = kernels.markdown(rows, {"gpu": "GPU", "date": "today", "commit": "abc", "copy_GBps": 200.0})
    assert text.count("| 2.00x | 3.00x |") == 2 * (len(kernels.BATCHES) * len(kernels.DIMS) + len(kernels.HEAD_SHAPES))
    assert "| bf16 | 1024 | 2048 | 2048 | 1.0000 | 2.0000 | 3.0000 |" in text
    kernels.plot(rows, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 10_000
