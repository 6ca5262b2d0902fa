"""The Triton kernel itself, run by the Triton interpreter on CPU tensors (tests/test_kernels.py starts this
file in a process with TRITON_INTERPRET=1 set before the kernel module is imported). fp32 and fp16 only:
the interpreter mishandles bf16."""

import os

import pytest
import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

from fastreg.kernels.normalized_regression import (  # noqa: E402
    INTERPRETED, loss_and_grad, normalized_regression_loss,
)

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
SHAPES = [(1, 1), (1, 300), (3, 7), (8, 64), (5, 1000), (17, 4099), (2, 8200)]  # D past one 4096 block


def reference(pred, target, weight, reduction, upstream=None):
    """F.normalize and autograd in float64; rows with a zero prediction get no gradient (the op's definition)."""
    p = pred.detach().double().requires_grad_()
    rows = (F.normalize(p, dim=1, eps=1e-12) - F.normalize(target.double(), dim=1, eps=1e-12)).pow(2).sum(1)
    if weight is not None:
        rows = rows * weight.double()
    loss = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    (grad,) = torch.autograd.grad(loss, p, upstream.double() if upstream is not None else torch.ones_like(loss))
    grad[p.norm(dim=1) <= 1e-12] = 0
    return loss.detach(), grad


def test_the_kernel_runs_interpreted():
    assert INTERPRETED


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grad_match_reference(shape, dtype, reduction):
    g = torch.Generator().manual_seed(shape[0] * 10_000 + shape[1])
    pred = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    target = torch.randn(shape, generator=g).to(dtype)
    weight = torch.rand(shape[0], 2, generator=g)[:, 1] if reduction != "sum" else None  # a strided view
    loss = normalized_regression_loss(pred, target, weight, reduction)
    upstream = torch.rand(loss.shape, generator=g) + 0.5  # backward must scale by grad_output
    loss.backward(upstream)
    ref_loss, ref_grad = reference(pred, target, weight, reduction, upstream)
    assert loss.dtype == torch.float32 and pred.grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype])
    torch.testing.assert_close(pred.grad.double(), ref_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_rows_are_finite(dtype):
    pred, target = torch.randn(4, 33).to(dtype), torch.randn(4, 33).to(dtype)
    pred[0], target[1] = 0, 0
    pred[2], target[2] = 0, 0
    rows, grad = loss_and_grad(pred, target, None, 1.0, True)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert rows[0] == pytest.approx(1.0, abs=1e-3) and rows[2] == 0  # F.normalize of zero rows is zero
    assert (grad[0] == 0).all() and (grad[2] == 0).all()
    torch.testing.assert_close(rows.double(), reference(pred, target, None, "none")[0], **TOL[dtype])


def test_non_contiguous_inputs():
    base = torch.randn(6, 80)
    pred, target = base[:, ::2], base.t().contiguous().t()[:, 1::2]  # column strides 2
    rows_view = torch.randn(10, 40)[::2]  # row stride 80, unit column stride: used as is
    for p, t in ((pred, target), (rows_view, torch.randn(5, 40))):
        rows, grad = loss_and_grad(p, t, None, 1.0, True)
        torch.testing.assert_close(rows.double(), reference(p, t, None, "none")[0], **TOL[torch.float32])
        torch.testing.assert_close(grad.double(), reference(p, t, None, "sum")[1], **TOL[torch.float32])


def test_target_gets_no_gradient():
    pred, target = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    normalized_regression_loss(pred, target).backward()
    assert pred.grad is not None and target.grad is None


def test_without_grad_only_the_loss_is_computed():
    pred, target = torch.randn(4, 5000), torch.randn(4, 5000)
    rows, grad = loss_and_grad(pred, target, None, 1.0, False)
    assert grad.numel() == 0
    torch.testing.assert_close(rows.double(), reference(pred, target, None, "none")[0], **TOL[torch.float32])
    with torch.no_grad():
        loss = normalized_regression_loss(pred.requires_grad_(), target)
    torch.testing.assert_close(loss.double(), reference(pred, target, None, "mean")[0], **TOL[torch.float32])
