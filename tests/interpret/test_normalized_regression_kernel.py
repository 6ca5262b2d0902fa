"""The Triton kernel itself, run by the Triton interpreter on CPU tensors (tests/test_kernels.py starts this
file in a process with TRITON_INTERPRET=1 set before the kernel module is imported). fp32 and fp16 only:
the interpreter mishandles bf16."""

import os

import pytest
import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

import fastreg.kernels.normalized_regression as nr  # noqa: E402
from fastreg.kernels.normalized_regression import (  # noqa: E402
    INTERPRETED,
    normalized_regression_loss,
    normalized_regression_losses,
)

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
SHAPES = [(1, 1), (1, 300), (3, 7), (8, 64), (5, 1000), (17, 4099), (2, 8200)]  # D past one 4096 block


def loss_and_grad(pred, target, weight, with_grad):
    """One term through the kernel: (w_b loss_b (B,), d sum_b w_b loss_b / d pred or an empty tensor)."""
    rows, (grad,) = nr.terms_loss_and_grad([pred], [target], [weight], False, False, [with_grad])
    return rows[0], grad


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
    rows, grad = loss_and_grad(pred, target, None, True)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert rows[0] == pytest.approx(1.0, abs=1e-3) and rows[2] == 0  # F.normalize of zero rows is zero
    assert (grad[0] == 0).all() and (grad[2] == 0).all()
    torch.testing.assert_close(rows.double(), reference(pred, target, None, "none")[0], **TOL[dtype])


def test_non_contiguous_inputs():
    base = torch.randn(6, 80)
    pred, target = base[:, ::2], base.t().contiguous().t()[:, 1::2]  # column strides 2
    rows_view = torch.randn(10, 40)[::2]  # row stride 80, unit column stride: used as is
    for p, t in ((pred, target), (rows_view, torch.randn(5, 40))):
        rows, grad = loss_and_grad(p, t, None, True)
        torch.testing.assert_close(rows.double(), reference(p, t, None, "none")[0], **TOL[torch.float32])
        torch.testing.assert_close(grad.double(), reference(p, t, None, "sum")[1], **TOL[torch.float32])


def test_target_gets_no_gradient():
    pred, target = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    normalized_regression_loss(pred, target).backward()
    assert pred.grad is not None and target.grad is None


def test_without_grad_only_the_loss_is_computed():
    pred, target = torch.randn(4, 5000), torch.randn(4, 5000)
    rows, grad = loss_and_grad(pred, target, None, False)
    assert grad.numel() == 0
    torch.testing.assert_close(rows.double(), reference(pred, target, None, "none")[0], **TOL[torch.float32])
    with torch.no_grad():
        loss = normalized_regression_loss(pred.requires_grad_(), target)
    torch.testing.assert_close(loss.double(), reference(pred, target, None, "mean")[0], **TOL[torch.float32])


def make_terms(batches, dims, dtype, seed=0):
    """Terms (pred, target, weight): pred requires grad, a weight (a strided view) on the first term only."""
    g = torch.Generator().manual_seed(seed)
    terms = []
    for k, (b, d) in enumerate(zip(batches, dims)):
        pred = torch.randn(b, d, generator=g).to(dtype).requires_grad_()
        weight = torch.rand(b, 2, generator=g)[:, 1] if k == 0 else None
        terms.append((pred, torch.randn(b, d, generator=g).to(dtype), weight))
    return terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batches, dims", [((3, 1, 5), (7, 300, 4099)), ((5, 5, 5), (7, 300, 33))])
def test_multi_terms_match_reference(batches, dims, dtype, reduction):
    """Three terms of different D (past one 4096 block, or all in one), odd B including 1; each term's loss and
    pred.grad under its own grad_output against float64 F.normalize autograd, and equal to the one-term op."""
    terms = make_terms(batches, dims, dtype, seed=sum(dims) + len(reduction))
    losses = normalized_regression_losses(terms, reduction)
    upstream = [torch.rand(loss.shape) + 0.5 for loss in losses]
    torch.autograd.backward(losses, upstream)
    assert len(losses) == len(terms)
    for (pred, target, weight), loss, up in zip(terms, losses, upstream):
        ref_loss, ref_grad = reference(pred, target, weight, reduction, up)
        assert loss.dtype == torch.float32 and pred.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype])
        torch.testing.assert_close(pred.grad.double(), ref_grad, **TOL[dtype])
        one = pred.detach().clone().requires_grad_()
        single = normalized_regression_loss(one, target, weight, reduction)
        single.backward(up)
        assert torch.equal(pred.grad, one.grad)  # rows are independent: the same gradient bit for bit
        torch.testing.assert_close(loss, single, rtol=1e-6, atol=0)  # the sum's tiles follow the widest term's D


class Launches:
    """Counts the Triton kernels the interpreter runs, with their grids."""

    def __init__(self, monkeypatch):
        self.grids = {}
        for kernel in (nr._terms_kernel, nr._scale_kernel):
            monkeypatch.setattr(kernel, "run", self.counting(kernel, kernel.run))

    def counting(self, kernel, run):
        def counted(*args, grid, **kwargs):
            self.grids.setdefault(kernel.fn.__name__, []).append(tuple(grid))
            return run(*args, grid=grid, **kwargs)

        return counted


def test_multi_terms_launch_once(monkeypatch):
    """One forward launch over all row tiles of all terms: a (row tiles, terms) grid, with rows per tile from the
    widest term; the backward scales each gradient in place, one launch per term."""
    launches = Launches(monkeypatch)
    terms = make_terms((3, 1, 5), (7, 300, 4099), torch.float32)
    losses = normalized_regression_losses(terms)
    assert launches.grids == {"_terms_kernel": [(5, 3)]}  # D 4099: one row per tile
    sum(losses).backward()
    assert launches.grids["_terms_kernel"] == [(5, 3)] and len(launches.grids["_scale_kernel"]) == 3
    assert all(pred.grad is not None for pred, _, _ in terms)


def test_more_terms_than_slots_launch_once_per_slots(monkeypatch):
    """MAX_TERMS + 1 terms: two launches, each term still its one-term loss and gradient."""
    launches = Launches(monkeypatch)
    n = nr.MAX_TERMS + 1
    terms = make_terms(range(1, n + 1), range(3, 3 + n), torch.float32)
    losses = normalized_regression_losses(terms, "sum")
    assert launches.grids == {"_terms_kernel": [(1, nr.MAX_TERMS), (1, 1)]}  # D <= 8: up to 64 rows per tile
    sum(losses).backward()
    for (pred, target, weight), loss in zip(terms, losses):
        ref_loss, ref_grad = reference(pred, target, weight, "sum")
        torch.testing.assert_close(loss.double(), ref_loss, **TOL[torch.float32])
        torch.testing.assert_close(pred.grad.double(), ref_grad, **TOL[torch.float32])


@pytest.mark.parametrize("per_row", [False, True])
def test_backward_scales_the_saved_gradient_in_place(per_row):
    """The forward writes the gradient for grad_output 1; backward scales that saved tensor in place (no new
    gradient tensor): unchanged where grad_output is 1, times grad_output elsewhere. A second backward is an error,
    not a gradient scaled twice."""
    pred, target = torch.randn(70, 33, requires_grad=True), torch.randn(70, 33)
    loss = normalized_regression_loss(pred, target, reduction="none" if per_row else "sum")
    saved = loss.grad_fn.saved_tensors[0]
    at_one = saved.clone()
    upstream = torch.ones(70) if per_row else torch.tensor(2.5)
    if per_row:
        upstream[3:5] = 2.5  # rows 3 and 4 scaled, the other rows' factor is 1
    loss.backward(upstream, retain_graph=True)
    expected = at_one * (upstream[:, None] if per_row else upstream)
    assert torch.equal(saved, expected) and torch.equal(pred.grad, expected)
    if per_row:
        assert torch.equal(saved[5:], at_one[5:])  # factor 1: untouched
    torch.testing.assert_close(
        pred.grad.double(),
        reference(pred, target, None, "none" if per_row else "sum", upstream)[1],
        **TOL[torch.float32],
    )
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward(upstream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_registered_ops_run_the_kernels(dtype):
    """Under the interpreter the ops have no CPU kernel: calling them runs the Triton kernels through
    wrap_triton, with the results of the direct launches, bit for bit."""
    (p0, t0, w0), (p1, t1, _) = make_terms((6, 3), (40, 5000), dtype)
    args = ([p0.detach(), p1.detach()], [t0, t1], [w0, None], True, True, [True, True])
    (op_out, op_grads), (out, grads) = nr.terms_loss_and_grad(*args), nr._launch_terms(nr._terms_kernel, *args)
    assert torch.equal(op_out, out) and all(torch.equal(a, b) for a, b in zip(op_grads, grads))
    factor = torch.rand(6) + 0.5
    nr.scale_(op_grads[0], factor)
    torch.testing.assert_close(op_grads[0], (grads[0].float() * factor[:, None]).to(dtype), rtol=0, atol=0)


def test_multi_terms_grads_only_where_needed():
    """A pred without requires_grad gets no gradient computed; a loss left out of backward gives its pred none;
    mixed dtypes share the launch."""
    (p0, t0, w0), (p1, t1, _), (p2, t2, _) = make_terms((4, 4, 4), (9, 20, 9), torch.float32)
    p1 = p1.detach().half()
    rows, grads = nr.terms_loss_and_grad(
        [p0, p1, p2], [t0, t1.half(), t2], [w0, None, None], True, False, [True, False, True]
    )
    assert [g.shape for g in grads] == [p0.shape, (0,), p2.shape]
    torch.testing.assert_close(rows[1].double(), reference(p1, t1.half(), None, "none")[0], **TOL[torch.float16])
    losses = normalized_regression_losses([(p0, t0, w0), (p1, t1.half(), None), (p2, t2, None)])
    losses[0].backward(retain_graph=True)
    assert p0.grad is not None and p1.grad is None and p2.grad is None
    torch.testing.assert_close(p0.grad.double(), reference(p0, t0, w0, "mean")[1], **TOL[torch.float32])
    (losses[1] + losses[2]).backward()
    assert p1.grad is None
    torch.testing.assert_close(p2.grad.double(), reference(p2, t2, None, "mean")[1], **TOL[torch.float32])
