"""Student heads: one MLP per teacher, mapping the student's pooled feature (width d) to the teacher's (D).

Heads exist only during distillation; fastreg.export drops them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fastreg.config import HeadConfig
from fastreg.kernel_choice import head_auto, impl_name, use_triton

log = logging.getLogger(__name__)


class L2Norm(nn.Module):
    """x / ||x|| along dim 1, (B, D) -> (B, D): SwAV's normalized projection (fastreg.teachers), the linear probes'
    first layer (fastreg.eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


# A head is a chain of Linear layers; each entry is (out_width, BN after it, ReLU after it).
LayerSpec = tuple[int, bool, bool]


def head_spec(cfg: HeadConfig, d: int, D: int) -> list[LayerSpec]:
    if cfg.kind == "linear":
        return [(D, False, False)]
    if cfg.kind == "mlp2":
        # SimReg's --n_mlp_layers 2: get_mlp adds BN/ReLU only when n_layers == 4 (UCDvision/simreg mlp_arch.py)
        return [(2 * d, False, False), (D, False, False)]
    if cfg.kind == "mlp2_bn":
        return [(2 * d, True, True), (D, False, False)]
    if cfg.kind == "simreg4":
        # SimReg's official head: a 2-layer "projection" then a 2-layer "prediction" MLP, with
        # deliberately no BN/ReLU after the second Linear (UCDvision/simreg mlp_arch.py).
        return [(2 * d, True, True), (d, False, False), (2 * d, True, True), (D, False, False)]
    if cfg.kind == "seed":
        return [(d, False, True), (D, False, False)]  # SEED's student MLP: no BN
    return [(h, cfg.bn, cfg.relu) for h in cfg.hidden] + [(D, False, False)]  # mlp


CPU = torch.device("cpu")


def build_head(
    cfg: HeadConfig, d: int, D: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32
) -> nn.Sequential:
    """An nn.Sequential of Linear/BatchNorm1d/ReLU; fastreg.kernels' FusedMLPHead of the same modules (the same
    state_dict) where head.impl chooses it for the device and the training dtype (autocast's, or fp32)."""
    layers: list[nn.Module] = []
    width = d
    for out, bn, relu in head_spec(cfg, d, D):
        layers.append(nn.Linear(width, out))
        if bn:
            layers.append(nn.BatchNorm1d(out))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        width = out
    fused, why = use_triton("head.impl", cfg.impl, device, lambda: _probe(device), lambda: head_auto(device, dtype))
    log.info("head %s %d->%d: %s (%s)", cfg.kind, d, D, impl_name(fused, device), why)
    if fused:
        from fastreg.kernels import FusedMLPHead

        return FusedMLPHead(*layers)
    return nn.Sequential(*layers)


def _probe(device: torch.device) -> None:
    """One training step of a small fused head."""
    from fastreg.kernels import FusedMLPHead

    head = FusedMLPHead(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8)).to(device)
    head(torch.randn(4, 8, device=device, requires_grad=True)).sum().backward()
    head[0].weight.grad.sum().item()
