"""SimReg's normalized regression loss and its gradient in one Triton pass over the rows (torch and triton only).

    loss_b = || p_b / n(p_b) - t_b / n(t_b) ||^2,   n(x) = max(||x||, eps)   (F.normalize's eps, 1e-12)
           = 2 - 2 cos(p_b, t_b)                      for rows whose norms exceed eps
    loss   = sum_b w_b loss_b / B  (reduction="mean"),  sum_b w_b loss_b ("sum"),  w_b loss_b ("none")

The target is a constant (the teacher's feature): only `pred` gets a gradient. Per row, with p, t, n_p = n(p),
n_t = n(t), d = p . t:

    d loss_b / d p = a p + b t,   a = 2 cos / n_p^2,   b = -2 / (n_p n_t),   cos = d / (n_p n_t)   (||p|| > eps)

A row with ||p|| <= eps (a zero prediction) has no direction to regress: its loss is F.normalize's
(||t / n_t||^2, so 1 for a nonzero target) and its gradient is defined as 0. (F.normalize's autograd gives
-2 t / (eps n_t), about 1e12, which overflows fp16.) A zero target row gives loss ||p / n_p||^2.

Memory traffic, fwd + bwd: 3 B D elements, the floor. The forward reads pred and target once and writes
d loss / d pred for a grad_output of 1, with the scalar loss (an fp32 atomic sum over the row tiles: its last bits
may differ between runs; the gradient does not). The backward scales that saved gradient in place by grad_output,
a kernel that reads grad_output on the device and touches no gradient byte when it is 1 (the usual case: no host
sync). So a saved gradient of B x D in pred's dtype lives from forward to backward, and backward runs once per
forward: a second backward through the same graph (retain_graph=True) is an error, not a gradient scaled twice.
Sums run in fp32 for fp32, fp16 and bf16 inputs; the loss is fp32 and the gradient has pred's dtype.

`normalized_regression_losses([(pred_k, target_k, weight_k), ...])` gives one loss per term (per teacher) from a
single launch: the kernel has MAX_TERMS slots of pointers, and program (tile, k) of a (row tiles, terms) grid does
tile `tile` of term k. The pointers come first and the scalars after; unused slots and absent weights or
gradients get a 1-element dummy and a constexpr flag, never None; sizes and strides are not specialized
(`do_not_specialize`), so a size of 1 is an argument like any other. torch.compile decides which tensors a
kernel writes by analysing its arguments; this layout keeps that analysis simple (tests/test_kernels.py checks it).

Three ways in, as Liger-Kernel: the functional forms above, the module `NormalizedRegressionLoss`, and the
registered ops `fastreg::normalized_regression_fwd` / `fastreg::normalized_regression_scale_` (triton_op), which
torch.compile and CUDA graphs capture. Eager calls launch the kernels directly (no dispatcher); under compile the
ops are used. CPU tensors run the same formulas in plain PyTorch (`eager_loss_and_grad`; also the ops' CPU
kernels), or the Triton kernels through the interpreter when TRITON_INTERPRET=1 was set before this module was
imported (the tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastreg.kernels.paths import say_path

EPS = 1e-12  # F.normalize's default
MAX_BLOCK = 4096  # columns per loop step: a 4096-wide fp32 row chunk is 16 KB of registers per program
TILE = 4096  # elements per tile of rows x columns when rows are short: many short rows per program
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_TERMS = 4  # pointer slots of _terms_kernel: terms per launch
SIZES = [f"{name}{k}" for k in range(MAX_TERMS) for name in ("B", "D", "SP", "ST")]


@triton.jit
def _tile_terms(sum_pp, sum_tt, dot, w, scale, eps):
    """(w loss, a, b) per row from its fp32 sums; d (scale w loss) / d p = a p + b t."""
    norm_p = tl.maximum(tl.sqrt(sum_pp), eps)
    norm_t = tl.maximum(tl.sqrt(sum_tt), eps)
    loss = sum_pp / (norm_p * norm_p) + sum_tt / (norm_t * norm_t) - 2.0 * dot / (norm_p * norm_t)
    cos = dot / (norm_p * norm_t)  # bounded, so 1 / n_p^2 <= 1e24 is the largest factor: no fp32 overflow
    alive = tl.sqrt(sum_pp) > eps  # a zero prediction gets no gradient
    a = tl.where(alive, 2.0 * cos / (norm_p * norm_p) * w * scale, 0.0)
    b = tl.where(alive, -2.0 / (norm_p * norm_t) * w * scale, 0.0)
    return w * loss, a, b


# The kernels' parameters grouped as the launch passes them, not one per line:
# fmt: off
@triton.jit
def _term(P, T, W, G, OUT, tile, B, D, stride_p, stride_t, eps, HAS_W: tl.constexpr, HAS_G: tl.constexpr,
          MEAN: tl.constexpr, REDUCE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Rows [tile ROWS, (tile + 1) ROWS) of one term, pred and target P, T (B, D) with unit column stride:
    w loss added to OUT[0] (REDUCE, times 1/B with MEAN) or stored to OUT[row]; with HAS_G, scale d (w loss) / dp
    to G (B, D) contiguous. ONE_BLOCK (D <= BLOCK): the tile stays in registers, read once. Else BLOCK-wide
    chunks: the sums, then a second read for the gradient (from L2 when the rows in flight fit there)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    live = rows < B
    rows64 = rows.to(tl.int64)
    p_rows, t_rows, g_rows = P + rows64[:, None] * stride_p, T + rows64[:, None] * stride_t, G + rows64[:, None] * D
    scale = 1.0 / B if MEAN else 1.0
    w = tl.load(W + rows, mask=live, other=0.0).to(tl.float32) if HAS_W else 1.0
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)[None, :]
        mask = live[:, None] & (cols < D)
        p = tl.load(p_rows + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_rows + cols, mask=mask, other=0.0).to(tl.float32)
        loss, a, b = _tile_terms(tl.sum(p * p, 1), tl.sum(t * t, 1), tl.sum(p * t, 1), w, scale, eps)
        if HAS_G:
            tl.store(g_rows + cols, (a[:, None] * p + b[:, None] * t).to(G.dtype.element_ty), mask=mask)
    else:
        pp = tl.zeros([ROWS, BLOCK], tl.float32)
        tt = tl.zeros([ROWS, BLOCK], tl.float32)
        pt = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)[None, :]
            mask = live[:, None] & (cols < D)
            p = tl.load(p_rows + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_rows + cols, mask=mask, other=0.0).to(tl.float32)
            pp += p * p
            tt += t * t
            pt += p * t
        loss, a, b = _tile_terms(tl.sum(pp, 1), tl.sum(tt, 1), tl.sum(pt, 1), w, scale, eps)
        if HAS_G:
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)[None, :]
                mask = live[:, None] & (cols < D)
                p = tl.load(p_rows + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_rows + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_rows + cols, (a[:, None] * p + b[:, None] * t).to(G.dtype.element_ty), mask=mask)
    loss = tl.where(live, loss, 0.0)
    if REDUCE:
        tl.atomic_add(OUT, tl.sum(loss, 0) * scale)
    else:
        tl.store(OUT + rows, loss, mask=live)
# fmt: on


# fmt: off
@triton.jit(do_not_specialize=["stride_out", *SIZES])
def _terms_kernel(OUT, P0, T0, W0, G0, P1, T1, W1, G1, P2, T2, W2, G2, P3, T3, W3, G3,
                  stride_out, eps, B0, D0, SP0, ST0, B1, D1, SP1, ST1, B2, D2, SP2, ST2, B3, D3, SP3, ST3,
                  TERMS: tl.constexpr, HAS_W0: tl.constexpr, HAS_W1: tl.constexpr, HAS_W2: tl.constexpr,
                  HAS_W3: tl.constexpr, HAS_G0: tl.constexpr, HAS_G1: tl.constexpr, HAS_G2: tl.constexpr,
                  HAS_G3: tl.constexpr, MEAN: tl.constexpr, REDUCE: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Up to MAX_TERMS terms in one (row tiles, TERMS) grid: program (tile, k) does tile `tile` of term k.
    Slot k: pred Pk, target Tk (Bk, Dk) with row strides SPk, STk, weight Wk (Bk,) if HAS_Wk, gradient Gk (Bk, Dk)
    contiguous if HAS_Gk; dummies otherwise. OUT: (TERMS,) zeros to add to (REDUCE) or (TERMS, max B) rows, row
    stride stride_out."""
    tile, k = tl.program_id(0), tl.program_id(1)
    if k == 0:
        _term(P0, T0, W0, G0, OUT, tile, B0, D0, SP0, ST0, eps, HAS_W0, HAS_G0, MEAN, REDUCE, ROWS, BLOCK, ONE_BLOCK)
    if TERMS > 1:
        if k == 1:
            _term(P1, T1, W1, G1, OUT + stride_out, tile, B1, D1, SP1, ST1, eps, HAS_W1, HAS_G1, MEAN, REDUCE,
                  ROWS, BLOCK, ONE_BLOCK)
    if TERMS > 2:
        if k == 2:
            _term(P2, T2, W2, G2, OUT + 2 * stride_out, tile, B2, D2, SP2, ST2, eps, HAS_W2, HAS_G2, MEAN, REDUCE,
                  ROWS, BLOCK, ONE_BLOCK)
    if TERMS > 3:
        if k == 3:
            _term(P3, T3, W3, G3, OUT + 3 * stride_out, tile, B3, D3, SP3, ST3, eps, HAS_W3, HAS_G3, MEAN, REDUCE,
                  ROWS, BLOCK, ONE_BLOCK)
# fmt: on


@triton.jit(do_not_specialize=["B", "D"])
def _scale_kernel(G, GO, B, D, PER_ROW: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """G (B, D) contiguous *= GO (a scalar, or (B,) with PER_ROW), in fp32; a tile whose factors are all 1 reads and
    writes nothing."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < B
    if PER_ROW:
        factor = tl.load(GO + rows, mask=live, other=1.0).to(tl.float32)
    else:
        factor = tl.zeros([ROWS], tl.float32) + tl.load(GO).to(tl.float32)
    if tl.max(tl.abs(factor - 1.0), 0) != 0.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = live[:, None] & (cols < D)
        at = G + rows.to(tl.int64)[:, None] * D + cols
        g = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        tl.store(at, (g * factor[:, None]).to(G.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launches and ops


def _tiling(dim: int) -> dict:
    """Columns per chunk, rows per program and warps for rows of `dim` columns."""
    block = min(MAX_BLOCK, triton.next_power_of_2(dim))
    rows = max(1, min(64, TILE // block))
    return dict(ROWS=rows, BLOCK=block, num_warps=4 if rows * block <= 1024 else 8)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernel walks each row with unit stride; any row stride is fine."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_terms(
    kernel: Callable,
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    mean: bool,
    reduce: bool,
    with_grad: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`terms_loss_and_grad` through `kernel` (_terms_kernel itself, or wrapped for tracing)."""
    n = len(preds)
    preds, targets = [_rows_contiguous(p) for p in preds], [_rows_contiguous(t) for t in targets]
    weights = [w.contiguous() if w is not None else None for w in weights]
    grads = [
        torch.empty_like(p, memory_format=torch.contiguous_format) if g else p.new_empty(0)
        for p, g in zip(preds, with_grad)
    ]
    batch = max(p.shape[0] for p in preds)
    out = preds[0].new_zeros(n, dtype=torch.float32) if reduce else preds[0].new_empty(n, batch, dtype=torch.float32)
    dummy = preds[0].new_empty(1)
    tiling = _tiling(max(p.shape[1] for p in preds))
    for first in range(0, n, MAX_TERMS):
        slots = range(first, min(n, first + MAX_TERMS))
        pointers, sizes, flags = [], [], {}
        for k in range(MAX_TERMS):
            i = first + k
            if i in slots:
                pointers += [
                    preds[i],
                    targets[i],
                    weights[i] if weights[i] is not None else dummy,
                    grads[i] if with_grad[i] else dummy,
                ]
                sizes += [*preds[i].shape, preds[i].stride(0), targets[i].stride(0)]
            else:
                pointers += [dummy] * 4
                sizes += [0] * 4
            flags |= {f"HAS_W{k}": i in slots and weights[i] is not None, f"HAS_G{k}": i in slots and with_grad[i]}
        kernel[(triton.cdiv(batch, tiling["ROWS"]), len(slots))](
            out[first:],
            *pointers,
            out.stride(0) if not reduce else 1,
            EPS,
            *sizes,
            TERMS=len(slots),
            **flags,
            MEAN=mean,
            REDUCE=reduce,
            ONE_BLOCK=max(p.shape[1] for p in preds) <= tiling["BLOCK"],
            **tiling,
        )
    return out, grads


def eager_loss_and_grad(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, scale: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's formulas in plain PyTorch (fp32 sums), one term: (w_b loss_b (B,) fp32, scale w_b d loss_b / dp
    in pred's dtype, or an empty tensor without with_grad)."""
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


def eager_terms_loss_and_grad(
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    mean: bool,
    reduce: bool,
    with_grad: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`terms_loss_and_grad` term by term in plain PyTorch: the op's CPU kernel."""
    batch = max(p.shape[0] for p in preds)
    out = preds[0].new_zeros(len(preds), *(() if reduce else (batch,)), dtype=torch.float32)
    grads = []
    for k, (pred, target, weight) in enumerate(zip(preds, targets, weights)):
        scale = 1.0 / pred.shape[0] if mean else 1.0
        rows, grad = eager_loss_and_grad(pred, target, weight, scale, with_grad[k])
        if reduce:
            out[k] = rows.sum() * scale
        else:
            out[k, : pred.shape[0]] = rows
        grads.append(grad)
    return out, grads


@triton_op("fastreg::normalized_regression_fwd", mutates_args=())
def terms_loss_and_grad(
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    mean: bool,
    reduce: bool,
    with_grad: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """n terms (pred_k, target_k (B_k, D_k), weight_k (B_k,) or None), scale_k = 1 / B_k if mean else 1, in one
    launch per MAX_TERMS terms: (out, [scale_k w_b d loss_b / d pred_k (B_k, D_k), or an empty tensor where not
    with_grad[k]]); out is (n,) fp32 with term k's scale_k sum_b w_b loss_b (reduce), else (n, max B) with term k's
    w_b loss_b in out[k, :B_k]."""
    return _launch_terms(wrap_triton(_terms_kernel), preds, targets, weights, mean, reduce, with_grad)


def _launch_scale(kernel: Callable, grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (B, D) *= grad_output: a 0-dim factor, or one per row (B,)."""
    per_row = grad_output.dim() == 1
    tiling = _tiling(grad.shape[1])
    grid = (triton.cdiv(grad.shape[0], tiling["ROWS"]), triton.cdiv(grad.shape[1], tiling["BLOCK"]))
    kernel[grid](grad, grad_output.contiguous(), grad.shape[0], grad.shape[1], PER_ROW=per_row, **tiling)


@triton_op("fastreg::normalized_regression_scale_", mutates_args=("grad",))
def scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (B, D) *= grad_output (a 0-dim tensor, or (B,)), in place, in fp32; nothing moves where it is 1."""
    _launch_scale(wrap_triton(_scale_kernel), grad, grad_output)


def eager_scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """`scale_` in plain PyTorch: the op's CPU kernel."""
    factor = grad_output.float().unsqueeze(1) if grad_output.dim() == 1 else grad_output.float()
    grad.copy_(grad.float() * factor)


if not INTERPRETED:  # Triton compiles for GPUs only: CPU tensors take the reference
    terms_loss_and_grad.register_kernel("cpu")(eager_terms_loss_and_grad)
    scale_.register_kernel("cpu")(eager_scale_)


def _runs_triton(x: torch.Tensor) -> bool:
    """Whether an eager call launches the Triton kernels itself (CUDA, or CPU under the interpreter)."""
    return x.is_cuda or INTERPRETED


# Which path a call takes: CPU tensors (no interpreter) run the PyTorch formulas as plain code, which compile
# traces like any other (compile would turn the op into its Triton kernel, which cannot build for a CPU); under
# compile the registered op, which compile and CUDA graphs capture; else the kernel launched directly, with no
# dispatcher in between.


def _forward(preds, targets, weights, mean, reduce, with_grad):
    say_path("normalized_regression_loss", preds[0], _runs_triton(preds[0]))
    if not _runs_triton(preds[0]):
        return eager_terms_loss_and_grad(preds, targets, weights, mean, reduce, with_grad)
    if torch.compiler.is_compiling():
        return terms_loss_and_grad(preds, targets, weights, mean, reduce, with_grad)
    return _launch_terms(_terms_kernel, preds, targets, weights, mean, reduce, with_grad)


def _scale(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    if not _runs_triton(grad):
        eager_scale_(grad, grad_output)
    elif torch.compiler.is_compiling():
        scale_(grad, grad_output)
    else:
        _launch_scale(_scale_kernel, grad, grad_output)


class NormalizedRegressionFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, reduction, n, *tensors):
        """tensors: n preds, n targets, n weights (or None); returns n losses."""
        preds, targets, weights = list(tensors[:n]), [t.detach() for t in tensors[n : 2 * n]], list(tensors[2 * n :])
        out, grads = _forward(
            preds, targets, weights, reduction == "mean", reduction != "none", list(ctx.needs_input_grad[2 : 2 + n])
        )
        ctx.save_for_backward(*grads)
        ctx.set_materialize_grads(False)  # a loss left out of backward gets None, not zeros
        ctx.scaled = set()  # terms whose saved gradient backward has scaled
        return tuple(out[k, : p.shape[0]] if reduction == "none" else out[k] for k, p in enumerate(preds))

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grad_outputs):
        terms = [k for k, out in enumerate(grad_outputs) if out is not None and ctx.needs_input_grad[2 + k]]
        if not torch.compiler.is_compiling():  # compiled backward graphs keep no Python state
            _mark_scaled(ctx, terms)  # before saved_tensors, whose in-place check would raise torch's own error
        grads = [grad if k in terms else None for k, grad in enumerate(ctx.saved_tensors)]
        for grad, out in zip(grads, grad_outputs):
            if grad is not None:
                _scale(grad, out)
        return None, None, *grads, *[None] * (2 * len(grads))


def _mark_scaled(ctx, terms: list[int]) -> None:
    """Record the terms whose saved gradient this backward scales; a term scaled before is an error."""
    twice = [k for k in terms if k in ctx.scaled]
    if twice:
        raise RuntimeError(
            f"the fused normalized regression loss scales its saved gradient in place, so it supports "
            f"one backward per forward and term (term {twice[0]} again): compute the loss again "
            f"instead of backward(retain_graph=True) twice"
        )
    ctx.scaled.update(terms)


def _check(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> None:
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, D); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if weight is not None and (weight.shape != pred.shape[:1] or weight.device != pred.device):
        raise ValueError(
            f"weight must be (B,) = ({pred.shape[0]},) on {pred.device}; got {tuple(weight.shape)} on {weight.device}"
        )
    if weight is not None and weight.requires_grad:
        raise ValueError("weight gets no gradient from this loss: pass weight.detach()")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def normalized_regression_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """SimReg's loss of pred (B, D) against the constant target (B, D), optional per-row weight (B,)."""
    _check(pred, target, weight, reduction)
    return NormalizedRegressionFunction.apply(reduction, 1, pred, target, weight)[0]


def normalized_regression_losses(
    terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], reduction: str = "mean"
) -> list[torch.Tensor]:
    """[normalized_regression_loss(pred, target, weight, reduction) for each term], all terms in one Triton launch
    (one per MAX_TERMS terms): pred and target (B_k, D_k), weight (B_k,) or None, per teacher. D_k, B_k and dtypes
    may differ between terms; all tensors on one device."""
    if not terms:
        raise ValueError("terms is empty: pass a list of (pred, target, weight or None)")
    device = terms[0][0].device
    for k, (pred, target, weight) in enumerate(terms):
        try:
            _check(pred, target, weight, reduction)
            if pred.device != device or target.device != device:
                raise ValueError(
                    f"all terms must be on one device, {device}; got pred on {pred.device} and "
                    f"target on {target.device}"
                )
        except ValueError as e:
            raise ValueError(f"term {k}: {e}") from None
    preds, targets, weights = zip(*terms)
    return list(NormalizedRegressionFunction.apply(reduction, len(terms), *preds, *targets, *weights))


class NormalizedRegressionLoss(torch.nn.Module):
    """`normalized_regression_loss` as a module: loss = NormalizedRegressionLoss()(pred, teacher_feature)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return normalized_regression_loss(pred, target, weight, self.reduction)
