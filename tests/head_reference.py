"""The reference for FusedMLPHead's tests (the interpreter suite and the GPU tests): the same modules run as a
plain nn.Sequential, in float64."""

import torch
from torch import nn

# (out width, BN after it, ReLU after it) per Linear, in units of the input width d; D is the output width
SPECS = {
    "linear": [],
    "mlp2": [(2, False, False)],  # SimReg's 2-layer head: two GEMMs, nothing between them
    "mlp2_bn": [(2, True, True)],
    "simreg4": [(2, True, True), (1, False, False), (2, True, True)],  # SimReg's official head
    "seed": [(1, False, True)],  # ReLU without BN
    "bn_only": [(1, True, False)],  # BN without ReLU
}
SHAPES = [(3, 5, 7), (17, 24, 33), (70, 40, 9)]  # (B, d, D): odd widths; B=70 spans two 64-row tiles
# Errors relative to the largest reference value of each tensor, or absolute below 1: a Linear's bias before BN
# has a gradient of exactly 0 in exact arithmetic, so only rounding remains.
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def eager_head(kind: str, d: int, D: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods, width = [], d
    for mult, bn, relu in SPECS[kind] + [(None, False, False)]:
        out = D if mult is None else mult * d
        mods.append(nn.Linear(width, out))
        if bn:
            mods.append(nn.BatchNorm1d(out))
            nn.init.uniform_(mods[-1].weight, 0.5, 1.5)  # not the identity affine, so its use is tested
            nn.init.uniform_(mods[-1].bias, -0.5, 0.5)
        if relu:
            mods.append(nn.ReLU())
        width = out
    return nn.Sequential(*mods)


def assert_near(value: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str):
    assert torch.isfinite(value).all(), what
    scale = max(ref.abs().max().item(), 1.0)
    err = (value.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} x {scale:.3g}"


def run(head: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    """(output, d x, {name: grad}) of one training-mode forward and backward."""
    x = x.detach().clone().requires_grad_()
    out = head(x)
    out.backward(upstream.to(out.dtype))
    return out.detach(), x.grad, {n: p.grad for n, p in head.named_parameters()}


def assert_runs_near(got: tuple, ref: tuple, dtype: torch.dtype, prefix: str = ""):
    """Two `run` results: output, d input and every parameter's gradient (names in got may carry prefix)."""
    out, dx, grads = got
    ref_out, ref_dx, ref_grads = ref
    assert_near(out, ref_out, dtype, "output")
    assert_near(dx, ref_dx, dtype, "d input")
    for name, grad in grads.items():
        assert_near(grad, ref_grads[name.removeprefix(prefix)], dtype, f"d {name}")
