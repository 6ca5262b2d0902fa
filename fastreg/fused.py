"""Which implementation runs for head.impl and loss.impl: fastreg.kernels' fused Triton kernels or eager PyTorch.

    auto    triton on CUDA, eager elsewhere
    triton  the fused kernels; where they cannot run (no Triton, a device it cannot compile for) eager runs,
            with a warning naming the key and the error
    eager   PyTorch ops
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def use_triton(key: str, impl: str, device: torch.device, probe: Callable[[], object]) -> bool:
    """Whether `key`=impl runs the fused kernels on device; probe() imports, compiles and launches them once,
    so a failure shows here, not at the first training step."""
    if impl == "eager" or (impl == "auto" and device.type != "cuda"):
        return False
    try:
        probe()
    except Exception as e:  # noqa: BLE001 - a missing or unsupported Triton fails in many ways
        log.warning("%s=%s: the fused kernel does not run on %s (%s: %s); using eager PyTorch", key, impl, device,
                    type(e).__name__, e)
        return False
    return True


def impl_name(fused: bool) -> str:
    """For train.log: what ran."""
    if not fused:
        return "eager PyTorch"
    from fastreg.kernels.mlp_head import INTERPRETED

    return "fused Triton kernels (fastreg.kernels)" + (", interpreted" if INTERPRETED else "")
