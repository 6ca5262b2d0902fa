"""Which path an op takes, said once per op, device and path at INFO (logger `fastreg.kernels`): the Triton
kernel, or its PyTorch formulas (CPU tensors, for which Triton does not build). A drop-in on a CPU otherwise
gives no sign that no kernel ran."""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("fastreg.kernels")


def say_path(op: str, x: torch.Tensor, triton: bool) -> None:
    """Log, once, that `op` on x's device runs its Triton kernel (`triton`) or its PyTorch formulas."""
    if not torch.compiler.is_compiling():  # a compiled graph keeps no Python calls; its first eager call said it
        _say(op, x.device.type, triton)


@functools.cache
def _say(op: str, device: str, triton: bool) -> None:
    if not triton:
        path = "its PyTorch formulas (Triton kernels build for GPUs only)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        path = "its Triton kernel, in Triton's interpreter (TRITON_INTERPRET=1)"
    else:
        path = "its Triton kernel"
    log.info("fastreg.kernels: %s on %s tensors runs %s", op, device, path)
