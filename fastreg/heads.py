"""Student heads: one MLP per teacher, mapping the student's pooled feature (width d) to the teacher's (D).

Heads exist only during distillation; fastreg.export drops them.
"""

from __future__ import annotations

from torch import nn

from fastreg.config import HeadConfig

# A head is a chain of Linear layers; each entry is (out_width, BN after it, ReLU after it).
LayerSpec = tuple[int, bool, bool]


def head_spec(cfg: HeadConfig, d: int, D: int) -> list[LayerSpec]:
    if cfg.kind == "linear":
        return [(D, False, False)]
    if cfg.kind == "mlp2":
        return [(2 * d, True, True), (D, False, False)]
    if cfg.kind == "simreg4":
        # SimReg's official head: a 2-layer "projection" then a 2-layer "prediction" MLP, with
        # deliberately no BN/ReLU after the second Linear (UCDvision/simreg mlp_arch.py).
        return [(2 * d, True, True), (d, False, False), (2 * d, True, True), (D, False, False)]
    if cfg.kind == "seed":
        return [(d, False, True), (D, False, False)]  # SEED's student MLP: no BN
    return [(h, cfg.bn, cfg.relu) for h in cfg.hidden] + [(D, False, False)]  # mlp


def build_head(cfg: HeadConfig, d: int, D: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d
    for out, bn, relu in head_spec(cfg, d, D):
        layers.append(nn.Linear(width, out))
        if bn:
            layers.append(nn.BatchNorm1d(out))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        width = out
    return nn.Sequential(*layers)
