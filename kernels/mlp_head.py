"""FusedMLPHead: an MLP head (Linear -> [BatchNorm1d] -> [ReLU] -> ... -> Linear) whose forward and backward
run as Triton GEMMs with the BatchNorm work fused into them (torch and triton only).

It is an nn.Sequential of the very same Linear / BatchNorm1d / ReLU modules, so its parameters, buffers and
state_dict are the eager head's: a checkpoint moves between them. Only `forward` differs.

Forward, layer l, from a_0 = x (B, K_1):
    z_l = a_{l-1} W_l^T + b_l                                            (B, N_l), stored
    a_l = act_l(z_l) = relu(z_l * scale_l + shift_l)                     never stored: the next GEMM applies
          scale = gamma rstd, shift = beta - mean scale                  it to its A tiles as they load
    With BatchNorm after the Linear, in training, the GEMM's epilogue writes each row tile's column mean and
    M2 = sum (z - mean_tile)^2; a finalize kernel merges the tiles in order (Chan et al.: no E[z^2] - mean^2
    cancellation), giving mean and the biased variance, and updates running_mean and running_var (unbiased)
    exactly as nn.BatchNorm1d does. In eval(), the running statistics give scale and shift.
Backward, from dz_l:
    dW_l = dz_l^T a_{l-1},  db_l = sum_b dz_l         one GEMM over the batch, act_{l-1} redone in its prologue
    da = dz_l W_l, then through act_{l-1} in the same GEMM's epilogue: dy = da [y > 0] (ReLU), and with BN the
    per-tile partial sums of dy and dy x_hat (x_hat = (z - mean) rstd). A last kernel reduces them and forms
        dz_{l-1} = gamma rstd (dy - sum_b dy / B - x_hat sum_b (dy x_hat) / B),  dgamma = sum dy x_hat,  dbeta = sum dy
All sums are fp32 in a fixed order (partials, then a reduce; no atomics), so results repeat bit for bit.
Under autocast the GEMMs take autocast's dtype, as nn.Linear does; weight gradients are accumulated in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _act_tile(a, mask, SCALE, SHIFT, idx, n, AFFINE: tl.constexpr, RELU: tl.constexpr, ON_ROWS: tl.constexpr):
    """relu(a * scale + shift) of a loaded tile, in fp32, back in a's dtype; scale and shift are indexed by the
    tile's columns (idx), or by its rows (ON_ROWS, when the tile is a transposed activation)."""
    x = a.to(tl.float32)
    if AFFINE:
        scale = tl.load(SCALE + idx, mask=idx < n, other=0.0)
        shift = tl.load(SHIFT + idx, mask=idx < n, other=0.0)
        if ON_ROWS:
            x = x * scale[:, None] + shift[:, None]
        else:
            x = x * scale[None, :] + shift[None, :]
    if RELU:
        x = tl.maximum(x, 0.0)
    return tl.where(mask, x, 0.0).to(a.dtype)  # padding stays 0: shift would leak into the sums


@triton.jit
def _matmul(A, B, sam, sak, sbk, sbn, M, N, K, rm, rn, SCALE, SHIFT,
            AFFINE: tl.constexpr, RELU: tl.constexpr, ACT_ON_ROWS: tl.constexpr, COL_SUMS: tl.constexpr,
            PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(acc (BM, BN) = act(A)[rm, :] @ B[:, rn] in fp32, with COL_SUMS the column sums of B[:, rn] (BN,), else 0)."""
    acc = tl.zeros((BM, BN), tl.float32)
    col_sums = tl.zeros((BN,), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a_mask = (rm[:, None] < M) & (rk[None, :] < K)
        a = tl.load(A + rm[:, None] * sam + rk[None, :] * sak, mask=a_mask, other=0.0)
        if AFFINE or RELU:
            if ACT_ON_ROWS:
                a = _act_tile(a, a_mask, SCALE, SHIFT, rm, M, AFFINE, RELU, True)
            else:
                a = _act_tile(a, a_mask, SCALE, SHIFT, rk, K, AFFINE, RELU, False)
        b = tl.load(B + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if COL_SUMS:
            col_sums += tl.sum(b.to(tl.float32), 0)
    return acc, col_sums


@triton.jit
def _linear_fwd_kernel(X, W, BIAS, Z, SCALE, SHIFT, PART, M, N, K, sxm, sxk, swn, swk, szm,
                       AFFINE: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Z (M, N) = act(X) (M, K) @ W^T + bias; with STATS, PART (2, M tiles, N) gets each tile's column mean and M2."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    acc, _ = _matmul(X, W, sxm, sxk, swk, swn, M, N, K, rm, rn, SCALE, SHIFT, AFFINE, RELU, False, False,
                     PRECISION, BM, BN, BK)
    acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    z = acc.to(Z.dtype.element_ty)
    tl.store(Z + rm[:, None] * szm + rn[None, :], z, mask=mask)
    if STATS:  # moments of the stored (rounded) z, which the next layer normalizes
        zf = tl.where(mask, z.to(tl.float32), 0.0)
        mean = tl.sum(zf, 0) / tl.minimum(M - pid_m * BM, BM).to(tl.float32)
        dev = tl.where(mask, zf - mean[None, :], 0.0)
        tl.store(PART + pid_m * N + rn, mean, mask=rn < N)
        tl.store(PART + (tl.num_programs(0) + pid_m) * N + rn, tl.sum(dev * dev, 0), mask=rn < N)


@triton.jit
def _bn_stats_kernel(PART, GAMMA, BETA, RUN_MEAN, RUN_VAR, MEAN, RSTD, SCALE, SHIFT, M, N, tiles, momentum, eps,
                     TILE_M: tl.constexpr, BLOCK: tl.constexpr):
    """Chan-merge the row tiles' (mean, M2) in order; write mean, rstd, the next prologue's scale and shift, and
    running <- (1 - momentum) running + momentum batch (unbiased variance), as nn.BatchNorm1d."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    count = 0.0
    mean = tl.zeros((BLOCK,), tl.float32)
    m2 = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, tiles):
        n_t = tl.minimum(M - t * TILE_M, TILE_M).to(tl.float32)
        mean_t = tl.load(PART + t * N + cols, mask=cmask, other=0.0)
        delta = mean_t - mean
        total = count + n_t
        mean += delta * (n_t / total)
        m2 += tl.load(PART + (tiles + t) * N + cols, mask=cmask, other=0.0) + delta * delta * (count * n_t / total)
        count = total
    var = m2 / M
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(GAMMA + cols, mask=cmask).to(tl.float32) * rstd
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(RSTD + cols, rstd, mask=cmask)
    tl.store(SCALE + cols, scale, mask=cmask)
    tl.store(SHIFT + cols, tl.load(BETA + cols, mask=cmask).to(tl.float32) - mean * scale, mask=cmask)
    run_mean = tl.load(RUN_MEAN + cols, mask=cmask).to(tl.float32)
    run_var = tl.load(RUN_VAR + cols, mask=cmask).to(tl.float32)
    tl.store(RUN_MEAN + cols, (1 - momentum) * run_mean + momentum * mean, mask=cmask)
    tl.store(RUN_VAR + cols, (1 - momentum) * run_var + momentum * var * M / (M - 1), mask=cmask)


@triton.jit
def _linear_dgrad_kernel(DZ, W, DA, Z, SCALE, SHIFT, MEAN, RSTD, PART, M, N, K, sdm, sdk, swk, swn, sam, szm,
                         RELU: tl.constexpr, HAS_BN: tl.constexpr, PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """DA (M, N) = DZ (M, K) @ W (K, N), then back through the previous layer's ReLU, whose input y = z scale + shift
    (or z without BN) is recomputed from Z. With HAS_BN, PART (2, M tiles, N) gets each tile's column sums of dy and
    dy x_hat."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    acc, _ = _matmul(DZ, W, sdm, sdk, swk, swn, M, N, K, rm, rn, SCALE, SHIFT, False, False, False, False,
                     PRECISION, BM, BN, BK)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    cmask = rn < N
    if RELU or HAS_BN:
        z = tl.load(Z + rm[:, None] * szm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = z
        if HAS_BN:
            y = z * tl.load(SCALE + rn, mask=cmask, other=0.0)[None, :] + tl.load(SHIFT + rn, mask=cmask, other=0.0)[None, :]
        acc = tl.where(y > 0, acc, 0.0)
    dy = acc.to(DA.dtype.element_ty)
    tl.store(DA + rm[:, None] * sam + rn[None, :], dy, mask=mask)
    if HAS_BN:
        dyf = tl.where(mask, dy.to(tl.float32), 0.0)
        x_hat = (z - tl.load(MEAN + rn, mask=cmask, other=0.0)[None, :]) * tl.load(RSTD + rn, mask=cmask, other=0.0)[None, :]
        tl.store(PART + pid_m * N + rn, tl.sum(dyf, 0), mask=cmask)
        tl.store(PART + (tl.num_programs(0) + pid_m) * N + rn, tl.sum(dyf * x_hat, 0), mask=cmask)


@triton.jit
def _bn_backward_kernel(DY, Z, PART, MEAN, RSTD, GAMMA, DZ, DGAMMA, DBETA, M, N, tiles, sym, szm, sdm,
                        TRAINING: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dz = gamma rstd (dy - sum dy / M - x_hat sum (dy x_hat) / M) (training; eval: gamma rstd dy); the sums are
    the dgrad tiles' partials, added in order by every program (the first row of programs stores dgamma, dbeta)."""
    pid_m = tl.program_id(0)
    rm, rn = pid_m * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = rn < N
    sum_dy = tl.zeros((BN,), tl.float32)
    sum_dy_xhat = tl.zeros((BN,), tl.float32)
    for t in range(0, tiles):
        sum_dy += tl.load(PART + t * N + rn, mask=cmask, other=0.0)
        sum_dy_xhat += tl.load(PART + (tiles + t) * N + rn, mask=cmask, other=0.0)
    if pid_m == 0:
        tl.store(DGAMMA + rn, sum_dy_xhat, mask=cmask)
        tl.store(DBETA + rn, sum_dy, mask=cmask)
    mask = (rm[:, None] < M) & cmask[None, :]
    dy = tl.load(DY + rm[:, None] * sym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rn, mask=cmask, other=0.0)
    gain = (tl.load(GAMMA + rn, mask=cmask, other=0.0).to(tl.float32) * rstd)[None, :]
    if TRAINING:
        z = tl.load(Z + rm[:, None] * szm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        x_hat = (z - tl.load(MEAN + rn, mask=cmask, other=0.0)[None, :]) * rstd[None, :]
        dz = gain * (dy - sum_dy[None, :] / M - x_hat * sum_dy_xhat[None, :] / M)
    else:
        dz = gain * dy
    tl.store(DZ + rm[:, None] * sdm + rn[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def _linear_wgrad_kernel(ZP, DZ, DW, DB, SCALE, SHIFT, M, N, K, szk, szm, sdk, sdn, swn, swm,
                         AFFINE: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """DW^T (M, N) = act(ZP)^T (M, K) @ DZ (K, N), with K the batch; the first row of programs also writes
    DB = the column sums of DZ."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    acc, col_sums = _matmul(ZP, DZ, szm, szk, sdk, sdn, M, N, K, rm, rn, SCALE, SHIFT, AFFINE, RELU, True,
                            True, PRECISION, BM, BN, BK)
    tl.store(DW + rn[None, :] * swn + rm[:, None] * swm, acc.to(DW.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if pid_m == 0:
        tl.store(DB + rn, col_sums.to(DB.dtype.element_ty), mask=rn < N)


# ---------------------------------------------------------------------------------------------------- launches


@dataclass
class Act:
    """How a layer's output z becomes the next layer's input: relu(z * scale + shift) (either part optional)."""

    relu: bool
    scale: Optional[torch.Tensor] = None  # (N,) fp32, with shift, when BatchNorm follows the Linear
    shift: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None  # (N,) fp32: the statistics that normalized z (batch or running)
    rstd: Optional[torch.Tensor] = None
    training: bool = False  # batch statistics: their gradient joins the backward

    @property
    def affine(self) -> bool:
        return self.scale is not None


def _row_block(M: int) -> int:
    """Rows per tile; it fixes the layout of the BN partials (2, cdiv(M, BM), N) for every kernel of a layer."""
    return 128 if M >= 512 else 64


def _tiles(M: int, N: int, dtype: torch.dtype) -> dict:
    """Block sizes by problem size; fixed (no autotuning) so that the BN partials' layout is known."""
    bm, bn = _row_block(M), (128 if N >= 512 else 64)
    return dict(BM=bm, BN=bn, BK=64 if dtype.itemsize == 2 else 32, num_warps=8 if bm * bn >= 128 * 128 else 4,
                num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 only where torch's nn.Linear would (torch.backends.cuda.matmul.allow_tf32)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _dummy(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(1, dtype=torch.float32)


def linear_forward(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: Optional[Act],
                   stats: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """z = act(a) @ weight^T + bias for a (M, K), weight (N, K): (z (M, N) in a's dtype, the BN partials
    (2, M tiles, N) fp32 when stats)."""
    (M, K), N = a.shape, weight.shape[0]
    cfg = _tiles(M, N, a.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    z = a.new_empty(M, N)
    part = a.new_empty(2, grid[0], N, dtype=torch.float32) if stats else _dummy(a)
    scale, shift = (act.scale, act.shift) if act is not None and act.affine else (_dummy(a), _dummy(a))
    _linear_fwd_kernel[grid](a, weight, bias, z, scale, shift, part, M, N, K, a.stride(0), a.stride(1),
                             weight.stride(0), weight.stride(1), z.stride(0),
                             AFFINE=act is not None and act.affine, RELU=act is not None and act.relu, STATS=stats,
                             PRECISION=_precision(a.dtype), **cfg)
    return z, part if stats else None


def batch_norm_stats(part: torch.Tensor, rows: int, bn: nn.BatchNorm1d, relu: bool) -> Act:
    """The batch's BN statistics from the forward GEMM's partials; updates bn's running statistics in place."""
    N = part.shape[2]
    mean, rstd, scale, shift = (part.new_empty(N) for _ in range(4))
    block = min(1024, triton.next_power_of_2(N))
    _bn_stats_kernel[(triton.cdiv(N, block),)](part, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                               mean, rstd, scale, shift, rows, N, part.shape[1], bn.momentum, bn.eps,
                                               TILE_M=_row_block(rows), BLOCK=block)
    bn.num_batches_tracked.add_(1)
    return Act(relu, scale, shift, mean, rstd, training=True)


def running_stats(bn: nn.BatchNorm1d, relu: bool) -> Act:
    """eval(): BN normalizes with its running statistics."""
    mean, rstd = bn.running_mean.float(), (bn.running_var.float() + bn.eps).rsqrt()
    scale = bn.weight.float() * rstd
    return Act(relu, scale, bn.bias.float() - mean * scale, mean, rstd, training=False)


def linear_dgrad(dz: torch.Tensor, weight: torch.Tensor, z_prev: Optional[torch.Tensor],
                 act: Optional[Act]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """d loss / d (the previous layer's z or BN output) for dz (M, N), weight (N, K): (dz @ weight (M, K) through
    act's ReLU, BN's partials (2, M tiles, K) when act has BN). Without act: the gradient of the head's input."""
    (M, N), K = dz.shape, weight.shape[1]
    cfg = _tiles(M, K, dz.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(K, cfg["BN"]))
    bn = act is not None and act.affine
    da = dz.new_empty(M, K)
    part = dz.new_empty(2, grid[0], K, dtype=torch.float32) if bn else _dummy(dz)
    z = z_prev if act is not None else _dummy(dz)
    scale, shift, mean, rstd = (act.scale, act.shift, act.mean, act.rstd) if bn else (_dummy(dz),) * 4
    _linear_dgrad_kernel[grid](dz, weight, da, z, scale, shift, mean, rstd, part, M, K, N, dz.stride(0),
                               dz.stride(1), weight.stride(0), weight.stride(1), da.stride(0), z.stride(0),
                               RELU=act is not None and act.relu, HAS_BN=bn, PRECISION=_precision(dz.dtype), **cfg)
    return da, part if bn else None


def batch_norm_backward(dy: torch.Tensor, z: torch.Tensor, part: torch.Tensor, act: Act,
                        bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz (M, N), dgamma, dbeta) from dy = d loss / d BN's output and the dgrad GEMM's partials."""
    M, N = dy.shape
    bm, bn_cols = _row_block(M), 64
    dz, dgamma, dbeta = torch.empty_like(dy), torch.empty_like(bn.weight), torch.empty_like(bn.bias)
    _bn_backward_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn_cols))](
        dy, z, part, act.mean, act.rstd, bn.weight, dz, dgamma, dbeta, M, N, part.shape[1], dy.stride(0),
        z.stride(0), dz.stride(0), TRAINING=act.training, BM=bm, BN=bn_cols)
    return dz, dgamma, dbeta


def linear_wgrad(a_prev: torch.Tensor, act: Optional[Act], dz: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW = dz^T act(a_prev) (N, K), db = sum_b dz (N,)) in dtype, for a_prev (B, K) and dz (B, N)."""
    (batch, K), N = a_prev.shape, dz.shape[1]
    cfg = _tiles(K, N, dz.dtype)
    grid = (triton.cdiv(K, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    dw, db = dz.new_empty(N, K, dtype=dtype), dz.new_empty(N, dtype=dtype)
    affine = act is not None and act.affine
    scale, shift = (act.scale, act.shift) if affine else (_dummy(dz), _dummy(dz))
    _linear_wgrad_kernel[grid](a_prev, dz, dw, db, scale, shift, K, N, batch, a_prev.stride(0), a_prev.stride(1),
                               dz.stride(0), dz.stride(1), dw.stride(0), dw.stride(1), AFFINE=affine,
                               RELU=act is not None and act.relu, PRECISION=_precision(dz.dtype), **cfg)
    return dw, db


# ------------------------------------------------------------------------------------------------------ module


@dataclass
class Layer:
    """Linear, then optionally BatchNorm1d, then optionally ReLU."""

    linear: nn.Linear
    bn: Optional[nn.BatchNorm1d]
    relu: bool

    def params(self) -> list[nn.Parameter]:
        return [self.linear.weight, self.linear.bias] + ([self.bn.weight, self.bn.bias] if self.bn else [])

    def act(self, z: torch.Tensor, part: Optional[torch.Tensor], training: bool) -> Optional[Act]:
        """How this layer's z feeds the next layer."""
        if self.bn is None:
            return Act(relu=True) if self.relu else None
        return batch_norm_stats(part, z.shape[0], self.bn, self.relu) if training else running_stats(self.bn, self.relu)


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype where it is on for x's device (as nn.Linear), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _HeadFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, layers: list[Layer], training: bool, *params):
        dtype = gemm_dtype(x)
        weights = [layer.linear.weight.to(dtype) for layer in layers]
        a, act, inputs, acts = x.to(dtype), None, [], []
        for layer, weight in zip(layers, weights):
            inputs.append(a)  # layer's input before act, which its GEMM applies
            acts.append(act)
            a, part = linear_forward(a, weight, layer.linear.bias, act, stats=training and layer.bn is not None)
            act = layer.act(a, part, training)
        ctx.save_for_backward(*inputs, *weights)
        ctx.layers, ctx.acts = layers, acts
        return a

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        n = len(ctx.layers)
        inputs, weights = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        dz, linear_grads, bn_grads, dx = grad_out.to(inputs[0].dtype), [[]] * n, [[]] * n, None
        for i in reversed(range(n)):
            layer, act = ctx.layers[i], ctx.acts[i]
            linear_grads[i] = list(linear_wgrad(inputs[i], act, dz, layer.linear.weight.dtype))
            if i == 0:
                dx = linear_dgrad(dz, weights[0], None, None)[0] if ctx.needs_input_grad[0] else None
                break
            dz, part = linear_dgrad(dz, weights[i], inputs[i], act)  # d loss / d (BN's output or z_{i-1})
            bn = ctx.layers[i - 1].bn
            if bn is not None:
                dz, dgamma, dbeta = batch_norm_backward(dz, inputs[i], part, act, bn)
                bn_grads[i - 1] = [dgamma, dbeta]
        params = [g for i in range(n) for g in linear_grads[i] + bn_grads[i]]  # the order of Layer.params
        return (dx, None, None, *params)


class FusedMLPHead(nn.Sequential):
    """An nn.Sequential of Linear, BatchNorm1d and ReLU modules whose forward and backward run fused in Triton.

        head = FusedMLPHead(*eager_head)    # the same modules: same parameters, buffers and state_dict

    Each Linear may be followed by a BatchNorm1d (affine, with running statistics and a momentum) and then a
    ReLU; the last Linear by neither. Input (B, K) -> output (B, N_last), on CUDA (or under TRITON_INTERPRET=1).
    """

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self.plan = _plan(list(modules))

    @torch.compiler.disable  # already fused: torch.compile runs it as it is, between its own graphs
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.plan[0].linear.in_features:
            raise ValueError(f"FusedMLPHead expects (B, {self.plan[0].linear.in_features}); got {tuple(x.shape)}")
        if not (x.is_cuda or INTERPRETED):
            raise RuntimeError(f"FusedMLPHead runs Triton kernels on CUDA tensors; got a {x.device} tensor. Use the "
                               "eager nn.Sequential of the same modules there (they share the state_dict).")
        if self.training and x.shape[0] < 2 and any(layer.bn for layer in self.plan):
            raise ValueError(f"BatchNorm needs more than 1 value per channel when training; got a batch of "
                             f"{x.shape[0]}")
        params = [p for layer in self.plan for p in layer.params()]
        return _HeadFunction.apply(x, self.plan, self.training, *params)


def _plan(modules: list[nn.Module]) -> list[Layer]:
    """Group the modules into Layers, or say what cannot be fused."""
    layers: list[Layer] = []
    for m in modules:
        if isinstance(m, nn.Linear):
            if m.bias is None:
                raise ValueError("FusedMLPHead: every Linear needs a bias (nn.Linear(..., bias=True))")
            layers.append(Layer(m, None, False))
        elif isinstance(m, nn.BatchNorm1d) and layers and layers[-1].bn is None and not layers[-1].relu:
            if not (m.affine and m.track_running_stats and m.momentum is not None):
                raise ValueError("FusedMLPHead: BatchNorm1d needs affine=True, track_running_stats=True and a "
                                 "momentum (not None)")
            layers[-1].bn = m
        elif isinstance(m, nn.ReLU) and layers and not layers[-1].relu:
            layers[-1].relu = True
        else:
            raise ValueError(f"FusedMLPHead fuses Linear [-> BatchNorm1d] [-> ReLU] chains; cannot place "
                             f"{type(m).__name__} after {[type(x).__name__ for x in modules[:modules.index(m)]]}")
    if not layers:
        raise ValueError("FusedMLPHead needs at least one Linear")
    if layers[-1].bn is not None or layers[-1].relu:
        raise ValueError("FusedMLPHead: the last Linear must have no BatchNorm1d or ReLU after it")
    for prev, layer in zip(layers, layers[1:]):
        if prev.linear.out_features != layer.linear.in_features:
            raise ValueError(f"FusedMLPHead: Linear widths do not chain: {prev.linear} then {layer.linear}")
    return layers
