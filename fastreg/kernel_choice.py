"""Which implementation runs for head.impl and loss.impl: fastreg.kernels' fused Triton kernels or eager PyTorch.

auto    loss: triton on CUDA (faster than eager at every size in the committed benchmarks/results); head:
        triton only on the GPUs and dtypes in HEAD_WINS, eager elsewhere; train.log says which and why
triton  the fused kernels; where they cannot run (no Triton, a device it cannot compile for) eager runs,
        with a warning naming the key and the error
eager   PyTorch ops
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# (GPU name, dtype) where FusedMLPHead (simreg4, training mode) ran fwd+bwd faster than eager PyTorch at every
# head shape, both replayed from CUDA graphs, in a committed benchmarks/results/**/kernels_*.json. Empty: no
# committed result shows such a win. tests/test_heads.py recomputes this set from the committed results; add an
# entry only with its result file.
HEAD_WINS: frozenset[tuple[str, str]] = frozenset()

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def loss_auto(device: torch.device) -> tuple[bool, str]:
    """(fused, why) for loss.impl=auto."""
    if device.type != "cuda":
        return False, f"loss.impl=auto: eager on {device.type}"
    return True, "loss.impl=auto: fused on CUDA"


def head_auto(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(fused, why) for head.impl=auto: fused only where a committed benchmark shows it faster than eager."""
    if device.type != "cuda":
        return False, f"head.impl=auto: eager on {device.type}"
    gpu, name = torch.cuda.get_device_name(device), DTYPE_NAMES[dtype]
    if (gpu, name) in HEAD_WINS:
        return True, f"head.impl=auto: fused, faster than eager on {gpu} in {name} (benchmarks/results)"
    return False, (
        f"head.impl=auto: eager, no committed benchmark shows the fused head faster than eager on "
        f"{gpu} in {name} (fastreg.kernel_choice.HEAD_WINS; head.impl=triton forces it)"
    )


def use_triton(
    key: str, impl: str, device: torch.device, probe: Callable[[], object], auto: Callable[[], tuple[bool, str]]
) -> tuple[bool, str]:
    """(whether `key`=impl runs the fused kernels on device, why); auto() decides for impl=auto. probe() imports,
    compiles and launches the kernels once, so a failure shows here, not at the first training step."""
    if impl == "eager":
        return False, f"{key}=eager"
    if impl == "auto":
        fused, why = auto()
        if not fused:
            return False, why
    else:
        why = f"{key}={impl}"
    try:
        probe()
    except Exception as e:  # noqa: BLE001 - a missing or unsupported Triton fails in many ways
        log.warning(
            "%s=%s: the fused kernel does not run on %s (%s: %s); using eager PyTorch",
            key,
            impl,
            device,
            type(e).__name__,
            e,
        )
        return False, f"{key}={impl}, but the kernel failed to run"
    return True, why


def impl_name(fused: bool, device: torch.device) -> str:
    """For train.log: what runs."""
    from fastreg.kernels.mlp_head import INTERPRETED

    if not fused:
        return "eager PyTorch"
    if device.type == "cpu" and not INTERPRETED:
        return "fused op, its PyTorch CPU kernel (fastreg.kernels; Triton runs on GPUs)"
    return "fused Triton kernels (fastreg.kernels)" + (", interpreted" if INTERPRETED else "")
