"""SimReg's normalized regression loss in one Triton pass per row, with its gradient (torch and triton only).

    loss_b = || p_b / n(p_b) - t_b / n(t_b) ||^2,   n(x) = max(||x||, eps)   (F.normalize's eps, 1e-12)
           = 2 - 2 cos(p_b, t_b)                      for rows whose norms exceed eps
    loss   = sum_b w_b loss_b / B  (reduction="mean"),  sum_b w_b loss_b ("sum"),  w_b loss_b ("none")

The target is a constant (the teacher's feature): only `pred` gets a gradient. As in Liger-Kernel, the
forward pass reads each row of pred and target once more to write d loss / d pred, so the backward only
scales it by grad_output. Per row, with p, t, n_p = n(p), n_t = n(t), d = p . t:

    d loss_b / d p = a p + b t,   a = 2 cos / n_p^2,   b = -2 / (n_p n_t),   cos = d / (n_p n_t)   (||p|| > eps)

A row with ||p|| <= eps (a zero prediction) has no direction to regress: its loss is F.normalize's
(||t / n_t||^2, so 1 for a nonzero target) and its gradient is defined as 0. (F.normalize's autograd
gives -2 t / (eps n_t), about 1e12, which overflows fp16.) A zero target row gives loss ||p / n_p||^2.
Sums run in fp32 for fp32, fp16 and bf16 inputs; the loss is fp32 and the gradient has pred's dtype.

On CUDA the op runs the Triton kernel. On CPU it runs the kernel through the Triton interpreter when
TRITON_INTERPRET=1 was set before this module was imported (the tests), else the same formulas in
plain PyTorch (`eager_loss_and_grad`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

EPS = 1e-12  # F.normalize's default
MAX_BLOCK = 4096  # columns per loop step: a 4096-wide fp32 row chunk is 16 KB of registers per program
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_terms(sum_pp, sum_tt, dot, w, scale, eps):
    """(w loss, a, b) of one row from its fp32 sums; d (scale w loss) / d p = a p + b t."""
    norm_p = tl.maximum(tl.sqrt(sum_pp), eps)
    norm_t = tl.maximum(tl.sqrt(sum_tt), eps)
    loss = sum_pp / (norm_p * norm_p) + sum_tt / (norm_t * norm_t) - 2.0 * dot / (norm_p * norm_t)
    cos = dot / (norm_p * norm_t)  # bounded, so 1 / n_p^2 <= 1e24 is the largest factor: no fp32 overflow
    alive = tl.sqrt(sum_pp) > eps  # a zero prediction gets no gradient
    a = tl.where(alive, 2.0 * cos / (norm_p * norm_p) * w * scale, 0.0)
    b = tl.where(alive, -2.0 / (norm_p * norm_t) * w * scale, 0.0)
    return w * loss, a, b


@triton.jit
def _short_rows_kernel(P, T, W, LOSS, G, stride_p, stride_t, stride_g, D, scale, eps,
                       HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of D <= BLOCK columns: the row stays in registers, read once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    p = tl.load(P + row * stride_p + cols, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + row).to(tl.float32) if HAS_WEIGHT else 1.0
    loss, a, b = _row_terms(tl.sum(p * p, 0), tl.sum(t * t, 0), tl.sum(p * t, 0), w, scale, eps)
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        tl.store(G + row * stride_g + cols, (a * p + b * t).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _long_rows_kernel(P, T, W, LOSS, G, stride_p, stride_t, stride_g, D, scale, eps,
                      HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of D > BLOCK columns, in BLOCK chunks: the sums, then a second read of the
    row for the gradient (from L2 when the rows in flight fit there)."""
    row = tl.program_id(0).to(tl.int64)
    p_row, t_row, g_row = P + row * stride_p, T + row * stride_t, G + row * stride_g
    pp = tl.zeros([BLOCK], tl.float32)
    tt = tl.zeros([BLOCK], tl.float32)
    pt = tl.zeros([BLOCK], tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        pp += p * p
        tt += t * t
        pt += p * t
    w = tl.load(W + row).to(tl.float32) if HAS_WEIGHT else 1.0
    loss, a, b = _row_terms(tl.sum(pp, 0), tl.sum(tt, 0), tl.sum(pt, 0), w, scale, eps)
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + cols, (a * p + b * t).to(G.dtype.element_ty), mask=mask)


def eager_loss_and_grad(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, scale: float,
                        with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's formulas in plain PyTorch (fp32 sums): the op's CPU implementation."""
    p, t = pred.float(), target.float()
    sum_pp, sum_tt, dot = p.pow(2).sum(1), t.pow(2).sum(1), (p * t).sum(1)
    norm_p, norm_t = sum_pp.sqrt().clamp_min(EPS), sum_tt.sqrt().clamp_min(EPS)
    rows = sum_pp / norm_p**2 + sum_tt / norm_t**2 - 2 * dot / (norm_p * norm_t)
    w = weight.float() if weight is not None else torch.ones_like(rows)
    alive = sum_pp.sqrt() > EPS
    a = torch.where(alive, 2 * dot / (norm_p * norm_t) / norm_p**2 * w * scale, 0.0)
    b = torch.where(alive, -2 / (norm_p * norm_t) * w * scale, 0.0)
    grad = (a[:, None] * p + b[:, None] * t).to(pred.dtype) if with_grad else pred.new_empty(0)
    return w * rows, grad


@triton_op("fastreg::normalized_regression_fwd", mutates_args=())
def loss_and_grad(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, scale: float,
                  with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_b loss_b (B,) fp32, scale * w_b d loss_b / d pred (B, D), or an empty tensor without with_grad)
    for pred, target (B, D) and weight (B,) or None."""
    pred, target = _rows_contiguous(pred), _rows_contiguous(target)
    weight = weight.contiguous() if weight is not None else None
    batch, dim = pred.shape
    rows = torch.empty(batch, dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred) if with_grad else pred.new_empty(0)
    block = min(MAX_BLOCK, triton.next_power_of_2(dim))
    kernel = _short_rows_kernel if dim <= block else _long_rows_kernel
    wrap_triton(kernel)[(batch,)](
        pred, target, weight if weight is not None else rows, rows, grad if with_grad else pred,
        pred.stride(0), target.stride(0), grad.stride(0) if with_grad else 0, dim, scale, EPS,
        HAS_WEIGHT=weight is not None, COMPUTE_GRAD=with_grad, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return rows, grad


if not INTERPRETED:  # Triton compiles for GPUs only: CPU tensors take the reference
    loss_and_grad.register_kernel("cpu")(eager_loss_and_grad)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernel walks each row with unit stride; any row stride is fine."""
    return x if x.stride(-1) == 1 else x.contiguous()


class NormalizedRegressionFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, pred, target, weight, reduction):
        _check(pred, target, weight, reduction)
        scale = 1.0 / pred.shape[0] if reduction == "mean" else 1.0
        rows, grad = loss_and_grad(pred, target.detach(), weight, scale, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return rows if reduction == "none" else rows.sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # One multiply in fp32, then pred's dtype. It always runs: skipping it when grad_output is 1 would
        # need a host sync in every backward.
        factor = grad_output.float().unsqueeze(1) if ctx.reduction == "none" else grad_output.float()
        return (grad * factor).to(grad.dtype), None, None, None


def _check(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> None:
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, D); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if weight is not None and (weight.shape != pred.shape[:1] or weight.device != pred.device):
        raise ValueError(f"weight must be (B,) = ({pred.shape[0]},) on {pred.device}; got {tuple(weight.shape)} "
                         f"on {weight.device}")
    if weight is not None and weight.requires_grad:
        raise ValueError("weight gets no gradient from this loss: pass weight.detach()")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def normalized_regression_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                               reduction: str = "mean") -> torch.Tensor:
    """SimReg's loss of pred (B, D) against the constant target (B, D), optional per-row weight (B,)."""
    return NormalizedRegressionFunction.apply(pred, target, weight, reduction)


class NormalizedRegressionLoss(torch.nn.Module):
    """`normalized_regression_loss` as a module: loss = NormalizedRegressionLoss()(pred, teacher_feature)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return normalized_regression_loss(pred, target, weight, self.reduction)
