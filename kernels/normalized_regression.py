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

`normalized_regression_losses([(pred_k, target_k, weight_k), ...])` gives each term's loss (one per teacher)
with the forward of all terms in one launch: the kernel has MAX_TERMS slots of pointer arguments, and program
(row, k) of a (max B_k, terms) grid does row `row` of term k. (A table of `data_ptr()`s cast to pointers in the
kernel would take any number of terms, but torch.compile runs a triton_op on fake tensors, which have none.)

On CUDA the ops run the Triton kernels. On CPU they run the kernels through the Triton interpreter when
TRITON_INTERPRET=1 was set before this module was imported (the tests), else the same formulas in
plain PyTorch (`eager_loss_and_grad`, term by term in `eager_terms_loss_and_grad`).
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
MAX_TERMS = 4  # pointer slots of _terms_kernel: terms per launch


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
def _row(P, T, W, LOSS, G, row, stride_p, stride_t, stride_g, D, scale, eps,
         HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Row `row` (int64) of P, T (D columns, unit column stride): w loss to LOSS + row and, with COMPUTE_GRAD,
    scale d (w loss) / dp to G's row. ONE_BLOCK (D <= BLOCK): the row stays in registers, read once. Else BLOCK
    chunks: the sums, then a second read of the row for the gradient (from L2 when the rows in flight fit there)."""
    p_row, t_row = P + row * stride_p, T + row * stride_t
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + row).to(tl.float32) if HAS_WEIGHT else 1.0
        loss, a, b = _row_terms(tl.sum(p * p, 0), tl.sum(t * t, 0), tl.sum(p * t, 0), w, scale, eps)
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            tl.store(G + row * stride_g + cols, (a * p + b * t).to(G.dtype.element_ty), mask=mask)
    else:
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
            g_row = G + row * stride_g
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < D
                p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_row + cols, (a * p + b * t).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _rows_kernel(P, T, W, LOSS, G, stride_p, stride_t, stride_g, D, scale, eps,
                 HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """One program per row of one (pred, target) pair."""
    _row(P, T, W, LOSS, G, tl.program_id(0).to(tl.int64), stride_p, stride_t, stride_g, D, scale, eps,
         HAS_WEIGHT, COMPUTE_GRAD, BLOCK, ONE_BLOCK)


@triton.jit
def _term_row(P, T, W, G, B, D, stride_p, stride_t, LOSS, row, eps,
              MEAN: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Row `row` of one term of `_terms_kernel`, if its slot holds a term (P) and row < B. W and G may be None."""
    if P is not None:
        if row < B:
            _row(P, T, W, LOSS, G, row, stride_p, stride_t, D, D, 1.0 / B if MEAN else 1.0, eps,
                 W is not None, G is not None, BLOCK, ONE_BLOCK)


@triton.jit
def _terms_kernel(LOSS, stride_loss, eps,
                  P0, T0, W0, G0, B0, D0, SP0, ST0,
                  P1, T1, W1, G1, B1, D1, SP1, ST1,
                  P2, T2, W2, G2, B2, D2, SP2, ST2,
                  P3, T3, W3, G3, B3, D3, SP3, ST3,
                  MEAN: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Up to MAX_TERMS terms in one grid of (max B, terms): program (row, k) does row `row` of term k.
    Slot k: pred Pk, target Tk (Bk, Dk) with row strides SPk, STk, weight Wk (Bk,) or None, gradient Gk
    (Bk, Dk) contiguous or None; unused slots are None. LOSS is (terms, max B), row stride stride_loss."""
    row, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    if k == 0:
        _term_row(P0, T0, W0, G0, B0, D0, SP0, ST0, LOSS, row, eps, MEAN, BLOCK, ONE_BLOCK)
    elif k == 1:
        _term_row(P1, T1, W1, G1, B1, D1, SP1, ST1, LOSS + stride_loss, row, eps, MEAN, BLOCK, ONE_BLOCK)
    elif k == 2:
        _term_row(P2, T2, W2, G2, B2, D2, SP2, ST2, LOSS + 2 * stride_loss, row, eps, MEAN, BLOCK, ONE_BLOCK)
    else:
        _term_row(P3, T3, W3, G3, B3, D3, SP3, ST3, LOSS + 3 * stride_loss, row, eps, MEAN, BLOCK, ONE_BLOCK)


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
    wrap_triton(_rows_kernel)[(batch,)](
        pred, target, weight if weight is not None else rows, rows, grad if with_grad else pred,
        pred.stride(0), target.stride(0), grad.stride(0) if with_grad else 0, dim, scale, EPS,
        HAS_WEIGHT=weight is not None, COMPUTE_GRAD=with_grad, BLOCK=block, ONE_BLOCK=dim <= block,
        num_warps=4 if block <= 1024 else 8,
    )
    return rows, grad


def eager_terms_loss_and_grad(preds: list[torch.Tensor], targets: list[torch.Tensor],
                              weights: list[torch.Tensor | None], mean: bool,
                              with_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`terms_loss_and_grad` term by term in plain PyTorch: the op's CPU implementation."""
    rows = torch.zeros(len(preds), max(p.shape[0] for p in preds), dtype=torch.float32, device=preds[0].device)
    grads = []
    for k, (pred, target, weight) in enumerate(zip(preds, targets, weights)):
        loss, grad = eager_loss_and_grad(pred, target, weight, 1.0 / pred.shape[0] if mean else 1.0, with_grad[k])
        rows[k, : pred.shape[0]] = loss
        grads.append(grad)
    return rows, grads


@triton_op("fastreg::normalized_regression_fwd_multi", mutates_args=())
def terms_loss_and_grad(preds: list[torch.Tensor], targets: list[torch.Tensor], weights: list[torch.Tensor | None],
                        mean: bool, with_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`loss_and_grad` of n terms (pred_k, target_k (B_k, D_k), weight_k (B_k,) or None), scale_k = 1 / B_k if
    mean else 1, in one launch per MAX_TERMS terms: (rows (n, max B) fp32, term k's w_b loss_b in rows[k, :B_k],
    [scale_k w_b d loss_b / d pred_k (B_k, D_k), or an empty tensor where not with_grad[k]])."""
    n = len(preds)
    preds, targets = [_rows_contiguous(p) for p in preds], [_rows_contiguous(t) for t in targets]
    weights = [w.contiguous() if w is not None else None for w in weights]
    grads = [torch.empty_like(p) if g else None for p, g in zip(preds, with_grad)]
    rows = torch.empty(n, max(p.shape[0] for p in preds), dtype=torch.float32, device=preds[0].device)
    dim = max(p.shape[1] for p in preds)
    block = min(MAX_BLOCK, triton.next_power_of_2(dim))
    for first in range(0, n, MAX_TERMS):
        slots = {}  # P0, T0, W0, G0, B0, D0, SP0, ST0, P1, ...: term first + k in slot k, None past the last term
        for k, i in enumerate(range(first, first + MAX_TERMS)):
            term = ((preds[i], targets[i], weights[i], grads[i], *preds[i].shape, preds[i].stride(0),
                     targets[i].stride(0)) if i < n else (None,) * 8)
            slots.update({f"{name}{k}": x for name, x in zip(("P", "T", "W", "G", "B", "D", "SP", "ST"), term)})
        wrap_triton(_terms_kernel)[(rows.shape[1], min(MAX_TERMS, n - first))](
            rows[first:], rows.stride(0), EPS, **slots, MEAN=mean, BLOCK=block, ONE_BLOCK=dim <= block,
            num_warps=4 if block <= 1024 else 8,
        )
    return rows, [g if g is not None else p.new_empty(0) for p, g in zip(preds, grads)]


if not INTERPRETED:  # Triton compiles for GPUs only: CPU tensors take the reference
    loss_and_grad.register_kernel("cpu")(eager_loss_and_grad)
    terms_loss_and_grad.register_kernel("cpu")(eager_terms_loss_and_grad)


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
        return _times(grad, grad_output, ctx.reduction), None, None, None


class NormalizedRegressionTermsFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, reduction, n, *tensors):
        """tensors: n preds, n targets, n weights (or None); returns n losses."""
        preds, targets, weights = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        scales = [1.0 / p.shape[0] if reduction == "mean" else 1.0 for p in preds]
        rows, grads = terms_loss_and_grad(list(preds), [t.detach() for t in targets], list(weights),
                                          reduction == "mean", list(ctx.needs_input_grad[2 : 2 + n]))
        ctx.save_for_backward(*grads)
        ctx.set_materialize_grads(False)  # a loss left out of backward gets None, not zeros
        ctx.reduction = reduction
        losses = [rows[k, : p.shape[0]] for k, p in enumerate(preds)]
        return tuple(r if reduction == "none" else r.sum() * s for r, s in zip(losses, scales))

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grad_outputs):
        grads = [_times(grad, out, ctx.reduction) if out is not None else None
                 for grad, out in zip(ctx.saved_tensors, grad_outputs)]
        return None, None, *grads, *[None] * (2 * len(grads))


def _times(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """grad (B, D) * grad_output (B,) ("none") or (): one multiply in fp32, then pred's dtype. It always runs:
    skipping it when grad_output is 1 would need a host sync in every backward."""
    factor = grad_output.float().unsqueeze(1) if reduction == "none" else grad_output.float()
    return (grad * factor).to(grad.dtype)


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


def normalized_regression_losses(terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                                 reduction: str = "mean") -> list[torch.Tensor]:
    """[normalized_regression_loss(pred, target, weight, reduction) for each term], the forward of all terms in
    one Triton launch (one per MAX_TERMS terms): pred and target (B_k, D_k), weight (B_k,) or None, per teacher.
    D_k, B_k and dtypes may differ between terms; all tensors on one device."""
    if not terms:
        raise ValueError("terms is empty: pass a list of (pred, target, weight or None)")
    device = terms[0][0].device
    for k, (pred, target, weight) in enumerate(terms):
        try:
            _check(pred, target, weight, reduction)
            if pred.device != device or target.device != device:
                raise ValueError(f"all terms must be on one device, {device}; got pred on {pred.device} and "
                                 f"target on {target.device}")
        except ValueError as e:
            raise ValueError(f"term {k}: {e}") from None
    preds, targets, weights = zip(*terms)
    return list(NormalizedRegressionTermsFunction.apply(reduction, len(terms), *preds, *targets, *weights))


class NormalizedRegressionLoss(torch.nn.Module):
    """`normalized_regression_loss` as a module: loss = NormalizedRegressionLoss()(pred, teacher_feature)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return normalized_regression_loss(pred, target, weight, self.reduction)
