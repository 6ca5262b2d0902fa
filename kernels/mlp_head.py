"""FusedMLPHead: an MLP head (Linear -> [BatchNorm1d] -> [ReLU] -> ... -> Linear) whose forward and backward
run as Triton GEMMs with the BatchNorm work fused into them (torch and triton only).

    head = FusedMLPHead(*eager_head)                                   # the module: same modules, same state_dict
    out = fused_mlp_head(x, weights, biases, norms, relu, training)    # the function it calls

FusedMLPHead is an nn.Sequential of the very same Linear / BatchNorm1d / ReLU modules, so its parameters, buffers
and state_dict are the eager head's: a checkpoint moves between them. Only `forward` differs.

Forward, layer l, from a_0 = x (B, K_1):
    z_l = a_{l-1} W_l^T + b_l                                            (B, N_l), stored
    a_l = act_l(z_l) = relu(z_l * scale_l + shift_l)                     never stored: the next GEMM applies
          scale = gamma rstd, shift = beta - mean scale                  it to its A tiles as they load
    With BatchNorm after the Linear, in training, the GEMM's epilogue writes each row tile's column mean and
    M2 = sum (z - mean_tile)^2; a statistics kernel merges the tiles in order (Chan et al.: no E[z^2] - mean^2
    cancellation), giving mean and the biased variance, and updates running_mean, running_var (unbiased) and
    num_batches_tracked exactly as nn.BatchNorm1d does. In eval(), it takes scale and shift from the running
    statistics.
Backward, from dz_l:
    dW_l = dz_l^T a_{l-1},  db_l = sum_b dz_l         one GEMM over the batch, act_{l-1} redone in its prologue
    da = dz_l W_l, then through act_{l-1} in the same GEMM's epilogue: dy = da [y > 0] (ReLU), and with BN the
    per-tile partial sums of dy and dy x_hat (x_hat = (z - mean) rstd). A last kernel reduces them and forms
        dz_{l-1} = gamma rstd (dy - sum_b dy / B - x_hat sum_b (dy x_hat) / B),  dgamma = sum dy x_hat,  dbeta = sum dy
    (in eval(): dz_{l-1} = gamma rstd dy).
All sums are fp32 in a fixed order (partials, then a reduce; no atomics), so results repeat bit for bit.
Under autocast the GEMMs take autocast's dtype (x and the weights cast once per forward, as autocast does for
nn.Linear); weight gradients are accumulated in fp32. Launches per training step: forward, one GEMM per Linear and
one statistics kernel per BN (in eval() too); backward, two GEMMs per Linear (the first Linear's d x only when x
needs it) and one kernel per BN. simreg4: 6 + 10.

GEMM tiles (BN, BK, warps, stages) are autotuned per problem size, fp32 precision and dtypes, except under
torch.use_deterministic_algorithms, where fixed tiles keep results independent of timing (another process
repeats them bit for bit). The row tile BM is always _row_block(M): a layer's BN partials (2, cdiv(M, BM), N)
pass between its kernels.

Three ways in, as Liger-Kernel: the module FusedMLPHead, the function fused_mlp_head, and the registered ops
fastreg::mlp_head_fwd (it writes its outputs into given tensors and updates the BN running statistics in place,
declared mutations) and fastreg::mlp_head_bwd (triton_op), joined by an autograd.Function; torch.compile
(fullgraph) and CUDA graphs capture them. Eager calls on CUDA launch the kernels directly (no dispatcher); under
compile the ops are used, and inductor traces them into their Triton kernels. CPU tensors run the same steps in
plain PyTorch (the *_torch functions, also the ops' CPU kernels), under compile too; or, when TRITON_INTERPRET=1
was set before this module was imported (the tests), the Triton kernels through the interpreter.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton

from fastreg.kernels.paths import say_path

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# A GEMM kernel compiles once per tile config and argument layout, not per problem size (which changes per layer and
# with the batch); strides stay specialized (their divisibility lets loads vectorize).
_GEMM_SIZES = ["M", "N", "K"]
# Every kernel takes its pointers before its scalars, and a 1-element dummy with a constexpr flag (HAS_STAT, STATS,
# TRAINING) where a pointer is unused, never None: torch.compile names the tensors a kernel writes from its TTIR's
# arguments, from which Triton drops a scalar equal to 1 (a unit stride) and None, so a scalar or a None before a
# pointer would shift the names; inductor's launcher also handles None arguments apart (tests/test_mlp_head.py
# checks what compile sees written).


# The kernels' parameters grouped as their launches pass them, not one per line:
# fmt: off
@triton.jit
def _act_tile(a, mask, STAT, idx, n, HAS_STAT: tl.constexpr, RELU: tl.constexpr, ON_ROWS: tl.constexpr):
    """relu(a * scale + shift) of a loaded tile, in fp32, back in a's dtype; scale and shift are rows 2 and 3 of
    STAT (4, n) (HAS_STAT; else no BN), indexed by the tile's columns (idx), or its rows (ON_ROWS: a transposed
    activation)."""
    x = a.to(tl.float32)
    if HAS_STAT:
        scale = tl.load(STAT + 2 * n + idx, mask=idx < n, other=0.0)
        shift = tl.load(STAT + 3 * n + idx, mask=idx < n, other=0.0)
        if ON_ROWS:
            x = x * scale[:, None] + shift[:, None]
        else:
            x = x * scale[None, :] + shift[None, :]
    if RELU:
        x = tl.maximum(x, 0.0)
    return tl.where(mask, x, 0.0).to(a.dtype)  # padding stays 0: shift would leak into the sums


@triton.jit
def _matmul(A, B, sam, sak, sbk, sbn, M, N, K, rm, rn, STAT, HAS_STAT: tl.constexpr, RELU: tl.constexpr,
            ACT_ON_ROWS: tl.constexpr,
            COL_SUMS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(acc (BM, BN) = act(A)[rm, :] @ B[:, rn] in fp32, with COL_SUMS the column sums of B[:, rn] (BN,), else 0)."""
    acc = tl.zeros((BM, BN), tl.float32)
    col_sums = tl.zeros((BN,), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a_mask = (rm[:, None] < M) & (rk[None, :] < K)
        a = tl.load(A + rm[:, None] * sam + rk[None, :] * sak, mask=a_mask, other=0.0)
        if HAS_STAT or RELU:
            if ACT_ON_ROWS:
                a = _act_tile(a, a_mask, STAT, rm, M, HAS_STAT, RELU, True)
            else:
                a = _act_tile(a, a_mask, STAT, rk, K, HAS_STAT, RELU, False)
        b = tl.load(B + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if COL_SUMS:
            col_sums += tl.sum(b.to(tl.float32), 0)
    return acc, col_sums


@triton.jit(do_not_specialize=_GEMM_SIZES)
def _linear_fwd_kernel(X, W, BIAS, Z, STAT, PART, M, N, K, sxm, sxk, swn, swk, szm,
                       HAS_STAT: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Z (M, N) = act(X) (M, K) @ W^T + bias, act from STAT (4, K) if HAS_STAT, and RELU; with STATS,
    PART (2, M tiles, N) gets each tile's column mean and M2."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    acc, _ = _matmul(X, W, sxm, sxk, swk, swn, M, N, K, rm, rn, STAT, HAS_STAT, RELU, False, False, PRECISION,
                     BM, BN, BK)
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
def _bn_stats_kernel(PART, GAMMA, BETA, RUN_MEAN, RUN_VAR, COUNT, STAT, M, N, momentum, eps,
                     TRAINING: tl.constexpr, TILE_M: tl.constexpr, BLOCK: tl.constexpr):
    """STAT (4, N) = mean, rstd, scale = gamma rstd, shift = beta - mean scale. Training (PART, the forward GEMM's
    (2, M tiles, N)): the batch's, the row tiles' (mean, M2) Chan-merged in order, and running <- (1 - momentum)
    running + momentum batch (unbiased variance), COUNT += 1, as nn.BatchNorm1d. Eval (not TRAINING; PART a dummy):
    the running statistics'."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    run_mean = tl.load(RUN_MEAN + cols, mask=cmask, other=0.0).to(tl.float32)
    run_var = tl.load(RUN_VAR + cols, mask=cmask, other=1.0).to(tl.float32)
    if TRAINING:
        tiles = tl.cdiv(M, TILE_M)
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
        tl.store(RUN_MEAN + cols, (1 - momentum) * run_mean + momentum * mean, mask=cmask)
        tl.store(RUN_VAR + cols, (1 - momentum) * run_var + momentum * var * M / (M - 1), mask=cmask)
        if tl.program_id(0) == 0:
            tl.store(COUNT, tl.load(COUNT) + 1)
    else:
        mean, var = run_mean, run_var
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(GAMMA + cols, mask=cmask).to(tl.float32) * rstd
    tl.store(STAT + cols, mean, mask=cmask)
    tl.store(STAT + N + cols, rstd, mask=cmask)
    tl.store(STAT + 2 * N + cols, scale, mask=cmask)
    tl.store(STAT + 3 * N + cols, tl.load(BETA + cols, mask=cmask).to(tl.float32) - mean * scale, mask=cmask)


@triton.jit(do_not_specialize=_GEMM_SIZES)
def _linear_dgrad_kernel(DZ, W, DA, Z, STAT, PART, M, N, K, sdm, sdk, swk, swn, sam, szm,
                         HAS_STAT: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """DA (M, N) = DZ (M, K) @ W (K, N), then back through the previous layer's ReLU, whose input y = z scale + shift
    (or z without BN) is recomputed from Z. With BN (HAS_STAT: STAT (4, N)), PART (2, M tiles, N) gets each tile's
    column sums of dy and dy x_hat. Z, STAT and PART are dummies where unused."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    acc, _ = _matmul(DZ, W, sdm, sdk, swk, swn, M, N, K, rm, rn, STAT, False, False, False, False, PRECISION,
                     BM, BN, BK)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    cmask = rn < N
    if RELU or HAS_STAT:
        z = tl.load(Z + rm[:, None] * szm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = z
        if HAS_STAT:
            y = (z * tl.load(STAT + 2 * N + rn, mask=cmask, other=0.0)[None, :]
                 + tl.load(STAT + 3 * N + rn, mask=cmask, other=0.0)[None, :])
        acc = tl.where(y > 0, acc, 0.0)
    dy = acc.to(DA.dtype.element_ty)
    tl.store(DA + rm[:, None] * sam + rn[None, :], dy, mask=mask)
    if HAS_STAT:
        dyf = tl.where(mask, dy.to(tl.float32), 0.0)
        x_hat = ((z - tl.load(STAT + rn, mask=cmask, other=0.0)[None, :])
                 * tl.load(STAT + N + rn, mask=cmask, other=0.0)[None, :])
        tl.store(PART + pid_m * N + rn, tl.sum(dyf, 0), mask=cmask)
        tl.store(PART + (tl.num_programs(0) + pid_m) * N + rn, tl.sum(dyf * x_hat, 0), mask=cmask)


@triton.jit
def _bn_backward_kernel(DY, Z, PART, STAT, GAMMA, DZ, DGAMMA, DBETA, M, N, sym, szm, sdm,
                        TRAINING: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dz = gamma rstd (dy - sum dy / M - x_hat sum (dy x_hat) / M) (training; eval: gamma rstd dy); the sums are
    the dgrad tiles' partials (2, M tiles, N), added in order by every program (the first row of programs stores
    dgamma, dbeta)."""
    pid_m = tl.program_id(0)
    rm, rn = pid_m * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = rn < N
    tiles = tl.cdiv(M, BM)
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
    rstd = tl.load(STAT + N + rn, mask=cmask, other=0.0)
    gain = (tl.load(GAMMA + rn, mask=cmask, other=0.0).to(tl.float32) * rstd)[None, :]
    if TRAINING:
        z = tl.load(Z + rm[:, None] * szm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        x_hat = (z - tl.load(STAT + rn, mask=cmask, other=0.0)[None, :]) * rstd[None, :]
        dz = gain * (dy - sum_dy[None, :] / M - x_hat * sum_dy_xhat[None, :] / M)
    else:
        dz = gain * dy
    tl.store(DZ + rm[:, None] * sdm + rn[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_GEMM_SIZES)
def _linear_wgrad_kernel(ZP, DZ, DW, DB, STAT, M, N, K, szk, szm, sdk, sdn, swn, swm,
                         HAS_STAT: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """DW^T (M, N) = act(ZP)^T (M, K) @ DZ (K, N), with K the batch and act from STAT (4, M) if HAS_STAT, and RELU;
    the first row of programs also writes DB = the column sums of DZ."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    acc, col_sums = _matmul(ZP, DZ, szm, szk, sdk, sdn, M, N, K, rm, rn, STAT, HAS_STAT, RELU, True, True, PRECISION,
                            BM, BN, BK)
    tl.store(DW + rn[None, :] * swn + rm[:, None] * swm, acc.to(DW.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if pid_m == 0:
        tl.store(DB + rn, col_sums.to(DB.dtype.element_ty), mask=rn < N)
# fmt: on


# ------------------------------------------------------------------------------------------- tiles and launches

# GEMM tiles (BN, BK, warps, stages) tried per (M, N, K, PRECISION) and the tensors' dtypes (triton adds those to
# the key); each fits a Hopper SM's shared memory at BM = 128 in fp32. The first is the fixed choice, and the
# interpreter's only one (it would run every config).
_TILES = [(64, 32, 4, 4), (32, 64, 4, 4), (128, 32, 4, 4), (128, 64, 8, 3)]
_GEMM_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=1 if INTERPRETED else s)
    for bn, bk, w, s in _TILES[: 1 if INTERPRETED else None]
]


def _tuned(kernel: triton.JITFunction) -> tuple[triton.runtime.Autotuner, triton.runtime.Autotuner]:
    """(kernel with tiles chosen by timing, kernel with the fixed first tiles)."""
    return (
        triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K", "PRECISION"])(kernel),
        triton.autotune(_GEMM_CONFIGS[:1], key=[])(kernel),
    )


_linear_fwd_tuned, _linear_fwd_fixed = _tuned(_linear_fwd_kernel)
_linear_dgrad_tuned, _linear_dgrad_fixed = _tuned(_linear_dgrad_kernel)
_linear_wgrad_tuned, _linear_wgrad_fixed = _tuned(_linear_wgrad_kernel)


def _pick(tuned: triton.runtime.Autotuner, fixed: triton.runtime.Autotuner) -> triton.runtime.Autotuner:
    """Timing picks among tiles whose sums run in different orders: under torch.use_deterministic_algorithms,
    fixed tiles, so that a run repeats another process's bit for bit."""
    return fixed if torch.are_deterministic_algorithms_enabled() else tuned


def _row_block(M: int) -> int:
    """Rows per tile; it fixes the layout of the BN partials (2, cdiv(M, BM), N) for every kernel of a layer."""
    return 128 if M >= 512 else 64


def _grid(M: int, BM: int, N: int):
    return lambda meta: (triton.cdiv(M, BM), triton.cdiv(N, meta["BN"]))


def _or_dummy(x: Tensor | None, like: Tensor) -> Tensor:
    """x, or a 1-element fp32 tensor on like's device for a pointer the kernel does not touch (its flag is off)."""
    return x if x is not None else like.new_empty(1, dtype=torch.float32)


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 only where torch's nn.Linear would (torch.backends.cuda.matmul.allow_tf32)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


# The launches' arguments grouped as the kernels declare them:
# fmt: off
def linear_forward(a: Tensor, weight: Tensor, bias: Tensor, stat: Tensor | None, relu: bool, z: Tensor,
                   with_stats: bool) -> Tensor | None:
    """z (M, N) <- act(a) @ weight^T + bias for a (M, K), weight (N, K), with act = relu(. * scale + shift), scale
    and shift from stat (4, K) or None; returns the BN partials (2, M tiles, N) fp32 if with_stats, else None."""
    (M, K), N = a.shape, weight.shape[0]
    BM = _row_block(M)
    part = a.new_empty(2, triton.cdiv(M, BM), N, dtype=torch.float32) if with_stats else None
    kernel = _pick(_linear_fwd_tuned, _linear_fwd_fixed)
    wrap_triton(kernel)[_grid(M, BM, N)](a, weight, bias, z, _or_dummy(stat, a), _or_dummy(part, a), M, N, K,
                                         a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), z.stride(0),
                                         HAS_STAT=stat is not None, RELU=relu, STATS=with_stats,
                                         PRECISION=_precision(a.dtype), BM=BM)
    return part


def batch_norm_stats(z: Tensor, part: Tensor | None, gamma: Tensor, beta: Tensor, running_mean: Tensor,
                     running_var: Tensor, count: Tensor, momentum: float, eps: float, training: bool,
                     stat: Tensor) -> None:
    """stat (4, N) fp32 <- mean, rstd, scale, shift of BatchNorm over z (M, N): in training the batch's, from the
    forward GEMM's partials (running_mean, running_var and count updated in place), else the running ones."""
    M, N = z.shape
    block = min(1024, triton.next_power_of_2(N))
    wrap_triton(_bn_stats_kernel)[(triton.cdiv(N, block),)](
        part if training else _or_dummy(None, z), gamma, beta, running_mean, running_var, count, stat, M, N,
        momentum, eps, TRAINING=training, TILE_M=_row_block(M), BLOCK=block)


def linear_dgrad(dz: Tensor, weight: Tensor, z_prev: Tensor | None, stat: Tensor | None,
                 relu: bool) -> tuple[Tensor, Tensor | None]:
    """(dy = dz @ weight (M, K) through the previous layer's ReLU (relu) at z_prev (M, K), the BN partials
    (2, M tiles, K) where that layer has BN (stat (4, K))) for dz (M, N), weight (N, K). With neither: d input."""
    (M, N), K = dz.shape, weight.shape[1]
    BM = _row_block(M)
    da = dz.new_empty(M, K)
    part = dz.new_empty(2, triton.cdiv(M, BM), K, dtype=torch.float32) if stat is not None else None
    kernel = _pick(_linear_dgrad_tuned, _linear_dgrad_fixed)
    wrap_triton(kernel)[_grid(M, BM, K)](dz, weight, da, _or_dummy(z_prev, dz), _or_dummy(stat, dz),
                                         _or_dummy(part, dz), M, K, N, dz.stride(0), dz.stride(1), weight.stride(0),
                                         weight.stride(1), da.stride(0), z_prev.stride(0) if z_prev is not None else 0,
                                         HAS_STAT=stat is not None, RELU=relu, PRECISION=_precision(dz.dtype), BM=BM)
    return da, part


def batch_norm_backward(dy: Tensor, z: Tensor, part: Tensor | None, stat: Tensor, gamma: Tensor,
                        training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dz (M, N), dgamma, dbeta) from dy = d loss / d BN's output, BN's input z and the dgrad GEMM's partials."""
    M, N = dy.shape
    BM, BN = _row_block(M), 64
    dz, dgamma, dbeta = torch.empty_like(dy), torch.empty_like(gamma), torch.empty_like(gamma)
    wrap_triton(_bn_backward_kernel)[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        dy, z, part, stat, gamma, dz, dgamma, dbeta, M, N, dy.stride(0), z.stride(0), dz.stride(0),
        TRAINING=training, BM=BM, BN=BN)
    return dz, dgamma, dbeta


def linear_wgrad(a_prev: Tensor, stat: Tensor | None, relu: bool, dz: Tensor,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dW = dz^T act(a_prev) (N, K), db = sum_b dz (N,)) in dtype, for a_prev (B, K), act from stat (4, K) or None
    and relu, and dz (B, N)."""
    (batch, K), N = a_prev.shape, dz.shape[1]
    BM = _row_block(K)
    dw, db = dz.new_empty(N, K, dtype=dtype), dz.new_empty(N, dtype=dtype)
    kernel = _pick(_linear_wgrad_tuned, _linear_wgrad_fixed)
    wrap_triton(kernel)[_grid(K, BM, N)](a_prev, dz, dw, db, _or_dummy(stat, dz), K, N, batch, a_prev.stride(0),
                                         a_prev.stride(1), dz.stride(0), dz.stride(1), dw.stride(0), dw.stride(1),
                                         HAS_STAT=stat is not None, RELU=relu, PRECISION=_precision(dz.dtype), BM=BM)
    return dw, db
# fmt: on


# ------------------------------------------------------------------- the same steps in PyTorch: the CPU kernels


def _act_torch(a: Tensor, stat: Tensor | None, relu: bool) -> Tensor:
    """_act_tile in PyTorch: relu(a * scale + shift) (either part optional) in fp32, back in a's dtype."""
    x = a.float()
    if stat is not None:
        x = x * stat[2] + stat[3]
    return (x.clamp_min(0) if relu else x).to(a.dtype)


def linear_forward_torch(a, weight, bias, stat, relu, z, with_stats):
    """linear_forward in PyTorch (no partials: batch_norm_stats_torch reads z)."""
    z.copy_(_act_torch(a, stat, relu).float() @ weight.float().T + bias.float())


def batch_norm_stats_torch(z, part, gamma, beta, running_mean, running_var, count, momentum, eps, training, stat):
    """batch_norm_stats in PyTorch, from z."""
    if training:
        mean, var = z.float().mean(0), z.float().var(0, correction=0)
        unbiased = var * z.shape[0] / (z.shape[0] - 1)
        running_mean.copy_((1 - momentum) * running_mean.float() + momentum * mean)
        running_var.copy_((1 - momentum) * running_var.float() + momentum * unbiased)
        count.add_(1)
    else:
        mean, var = running_mean.float(), running_var.float()
    rstd = (var + eps).rsqrt()
    scale = gamma.float() * rstd
    stat.copy_(torch.stack([mean, rstd, scale, beta.float() - mean * scale]))


def linear_dgrad_torch(dz, weight, z_prev, stat, relu):
    """linear_dgrad in PyTorch (no partials: batch_norm_backward_torch sums dy)."""
    da = dz.float() @ weight.float()
    if relu:
        y = z_prev.float() * stat[2] + stat[3] if stat is not None else z_prev
        da = torch.where(y > 0, da, 0.0)
    return da.to(dz.dtype), None


def batch_norm_backward_torch(dy, z, part, stat, gamma, training):
    """batch_norm_backward in PyTorch."""
    M, dyf, x_hat = dy.shape[0], dy.float(), (z.float() - stat[0]) * stat[1]
    sum_dy, sum_dy_xhat = dyf.sum(0), (dyf * x_hat).sum(0)
    dz = gamma.float() * stat[1] * (dyf - sum_dy / M - x_hat * sum_dy_xhat / M if training else dyf)
    return dz.to(dy.dtype), sum_dy_xhat.to(gamma.dtype), sum_dy.to(gamma.dtype)


def linear_wgrad_torch(a_prev, stat, relu, dz, dtype):
    """linear_wgrad in PyTorch."""
    dzf = dz.float()
    return (dzf.T @ _act_torch(a_prev, stat, relu).float()).to(dtype), dzf.sum(0).to(dtype)


# ------------------------------------------------------------------------------------------------------- ops


def _per_layer(values: Sequence[Tensor], has_bn: Sequence[bool]) -> list[Tensor | None]:
    """The BN layers' values (one per True in has_bn) placed at their layers, None elsewhere."""
    it = iter(values)
    return [next(it) if bn else None for bn in has_bn]


def _forward(linear, batch_norm, x, weights, biases, gammas, betas, running_means, running_vars, counts, has_bn, relu,
             momentum, eps, training, zs, stats):  # fmt: skip
    """mlp_head_fwd with the steps linear (linear_forward or _torch) and batch_norm (batch_norm_stats or _torch)."""
    bns = iter(zip(gammas, betas, running_means, running_vars, counts, momentum, eps))
    a, stat, stats = x, None, _per_layer(stats, has_bn)
    for layer, (weight, bias, z) in enumerate(zip(weights, biases, zs)):
        part = linear(a, weight, bias, stat, layer > 0 and relu[layer - 1], z, training and has_bn[layer])
        if has_bn[layer]:
            batch_norm(z, part, *next(bns), training, stats[layer])
        a, stat = z, stats[layer]


def _backward(
    dgrad, bn_backward, wgrad, grad_out, x, zs, weights, gammas, stats, has_bn, relu, training, input_grad, param_dtype
):
    """mlp_head_bwd with the steps dgrad, bn_backward and wgrad (linear_dgrad, batch_norm_backward, linear_wgrad
    or their _torch versions)."""
    n = len(weights)
    inputs = [x, *zs]  # layer l's input before act_{l-1}, which its kernels apply
    stats, gammas = [None, *_per_layer(stats, has_bn)], [None, *_per_layer(gammas, has_bn)]  # act_{l-1}'s BN at l
    relu = [False, *relu]  # act_{l-1}'s ReLU at l
    dz, dws, dbs, bn_grads = grad_out, [None] * n, [None] * n, []
    for layer in reversed(range(n)):
        dws[layer], dbs[layer] = wgrad(inputs[layer], stats[layer], relu[layer], dz, param_dtype)
        if layer == 0:
            break
        # d loss / d (BN's output or z_{l-1})
        dz, part = dgrad(dz, weights[layer], inputs[layer], stats[layer], relu[layer])
        if stats[layer] is not None:
            dz, dgamma, dbeta = bn_backward(dz, inputs[layer], part, stats[layer], gammas[layer], training)
            bn_grads.insert(0, (dgamma, dbeta))
    dx = dgrad(dz, weights[0], None, None, False)[0] if input_grad else x.new_empty(0)
    return dx, dws, dbs, [g for g, _ in bn_grads], [b for _, b in bn_grads]


@triton_op("fastreg::mlp_head_fwd", mutates_args=("running_means", "running_vars", "counts", "zs", "stats"))
def mlp_head_fwd(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    gammas: list[Tensor],
    betas: list[Tensor],
    running_means: list[Tensor],
    running_vars: list[Tensor],
    counts: list[Tensor],
    has_bn: list[bool],
    relu: list[bool],
    momentum: list[float],
    eps: list[float],
    training: bool,
    zs: list[Tensor],
    stats: list[Tensor],
) -> None:
    """The head's forward for x (B, K_1) and weights (N_l, K_l), both in the GEMM dtype, biases (N_l,); Linear l is
    followed by BatchNorm if has_bn[l], then ReLU if relu[l]. Per BN layer (in order): gammas, betas, running_means,
    running_vars (N_l,), counts (num_batches_tracked, ()), momentum, eps; training updates the last three in place.
    Writes zs: z_l (B, N_l) per layer in x's dtype, the last the head's output, and stats: (4, N_l) fp32 mean, rstd,
    scale, shift per BN layer. (Outputs are written in place: a mutating op cannot return lists of tensors under
    torch.compile.)"""
    return _forward(linear_forward, batch_norm_stats, x, weights, biases, gammas, betas, running_means, running_vars,
                    counts, has_bn, relu, momentum, eps, training, zs, stats)  # fmt: skip


@triton_op("fastreg::mlp_head_bwd", mutates_args=())
def mlp_head_bwd(
    grad_out: Tensor,
    x: Tensor,
    zs: list[Tensor],
    weights: list[Tensor],
    gammas: list[Tensor],
    stats: list[Tensor],
    has_bn: list[bool],
    relu: list[bool],
    training: bool,
    input_grad: bool,
    param_dtype: torch.dtype,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The head's backward from grad_out (B, N_last) and mlp_head_fwd's x, weights, gammas, zs (all but the last)
    and stats: (d x (B, K_1) in x's dtype, or an empty tensor without input_grad; d weights, d biases (param_dtype);
    d gammas, d betas per BN layer (their dtype))."""
    return _backward(linear_dgrad, batch_norm_backward, linear_wgrad, grad_out, x, zs, weights, gammas, stats, has_bn,
                     relu, training, input_grad, param_dtype)  # fmt: skip


def _mlp_head_fwd_torch(*args):
    """mlp_head_fwd in PyTorch: its CPU kernel."""
    with torch.autocast(args[0].device.type, enabled=False):  # the inputs already have their dtypes
        return _forward(linear_forward_torch, batch_norm_stats_torch, *args)


def _mlp_head_bwd_torch(*args):
    """mlp_head_bwd in PyTorch: its CPU kernel."""
    with torch.autocast(args[0].device.type, enabled=False):
        return _backward(linear_dgrad_torch, batch_norm_backward_torch, linear_wgrad_torch, *args)


if not INTERPRETED:  # Triton compiles for GPUs only: CPU tensors take the PyTorch steps
    mlp_head_fwd.register_kernel("cpu")(_mlp_head_fwd_torch)
    mlp_head_bwd.register_kernel("cpu")(_mlp_head_bwd_torch)
else:  # the interpreter runs kernels on real tensors only: tracing (fake tensors) takes the PyTorch steps' outputs
    mlp_head_fwd.register_fake(_mlp_head_fwd_torch)
    mlp_head_bwd.register_fake(_mlp_head_bwd_torch)


# Which path a call takes, as the loss's (normalized_regression.py): CPU tensors (no interpreter; any device but
# CUDA) run the PyTorch steps as plain code, which compile traces like any other (compile would turn the op into
# its Triton kernels, which cannot build for a CPU); under compile the registered op, which compile and CUDA graphs
# capture; else the kernels launched directly, with no dispatcher in between (set_wrap_triton_enabled(False), as
# triton_op's own eager call does).


def _head_fwd(*args) -> None:
    say_path("fused_mlp_head", args[0], args[0].is_cuda or INTERPRETED)
    if not (args[0].is_cuda or INTERPRETED):
        _mlp_head_fwd_torch(*args)
    elif torch.compiler.is_compiling():
        mlp_head_fwd(*args)
    else:
        with set_wrap_triton_enabled(False):
            _forward(linear_forward, batch_norm_stats, *args)


def _head_bwd(*args) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    if not (args[0].is_cuda or INTERPRETED):
        return _mlp_head_bwd_torch(*args)
    if torch.compiler.is_compiling():
        return mlp_head_bwd(*args)
    with set_wrap_triton_enabled(False):
        return _backward(linear_dgrad, batch_norm_backward, linear_wgrad, *args)


# --------------------------------------------------------------------------------------- autograd and function


def gemm_dtype(x: Tensor) -> torch.dtype:
    """autocast's dtype where it is on for x's device (as nn.Linear), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _split(items: Sequence, sizes: Sequence[int]) -> list[list]:
    bounds = list(itertools.accumulate(sizes, initial=0))
    return [list(items[start:end]) for start, end in zip(bounds, bounds[1:])]


class _HeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, *tensors):
        """spec: (has_bn, relu, momentum, eps, training); tensors: weights, biases, then per BN layer gammas, betas,
        running means, running variances, counts."""
        has_bn, relu, momentum, eps, training = spec
        n, m = len(relu), sum(has_bn)
        weights, biases, gammas, betas, means, variances, counts = _split(tensors, (n, n, m, m, m, m, m))
        dtype = gemm_dtype(x)
        x, cast = x.to(dtype), [weight.to(dtype) for weight in weights]
        zs = [x.new_empty(x.shape[0], weight.shape[0]) for weight in weights]
        stats = [x.new_empty(4, weight.shape[0], dtype=torch.float32) for weight, bn in zip(weights, has_bn) if bn]
        _head_fwd(
            x, cast, biases, gammas, betas, means, variances, counts, has_bn, relu, momentum, eps, training, zs, stats
        )
        ctx.save_for_backward(x, *cast, *gammas, *zs[:-1], *stats)
        ctx.spec, ctx.param_dtype = spec, weights[0].dtype
        return zs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        has_bn, relu, _, _, training = ctx.spec
        n, m = len(relu), sum(has_bn)
        (x,), weights, gammas, zs, stats = _split(ctx.saved_tensors, (1, n, m, n - 1, m))
        dx, dws, dbs, dgammas, dbetas = _head_bwd(
            grad_out, x, zs, weights, gammas, stats, has_bn, relu, training, ctx.needs_input_grad[0], ctx.param_dtype
        )
        return dx if ctx.needs_input_grad[0] else None, None, *dws, *dbs, *dgammas, *dbetas, *[None] * (3 * m)


class BatchNorm(NamedTuple):
    """One BatchNorm1d's tensors and constants, as fused_mlp_head takes them."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    momentum: float
    eps: float

    @classmethod
    def of(cls, bn: nn.BatchNorm1d) -> BatchNorm:
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)


def fused_mlp_head(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    norms: Sequence[BatchNorm | None],
    relu: Sequence[bool],
    training: bool,
) -> Tensor:
    """The head's output (B, N_last) for x (B, K_1): layer l is z = a @ weights[l]^T + biases[l] (weights[l]
    (N_l, K_l)), then the BatchNorm norms[l] (or none; batch statistics if training, which updates its running
    statistics and num_batches_tracked in place, else its running statistics), then a ReLU if relu[l]. Under
    autocast the output has autocast's dtype; gradients reach x, weights, biases and the BatchNorms' weight, bias."""
    _check(x, weights, biases, norms, relu, training)
    bns = [bn for bn in norms if bn is not None]
    spec = (
        tuple(bn is not None for bn in norms),
        tuple(relu),
        tuple(bn.momentum for bn in bns),
        tuple(bn.eps for bn in bns),
        training,
    )
    bn_tensors = [getattr(bn, field) for field in BatchNorm._fields[:5] for bn in bns]  # gammas, betas, ...
    return _HeadFunction.apply(x, spec, *weights, *biases, *bn_tensors)


def _check(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    norms: Sequence[BatchNorm | None],
    relu: Sequence[bool],
    training: bool,
) -> None:
    if not len(weights) == len(biases) == len(norms) == len(relu) > 0:
        raise ValueError(
            f"fused_mlp_head needs one bias, norm (or None) and relu flag per weight; got "
            f"{len(weights)} weights, {len(biases)} biases, {len(norms)} norms, {len(relu)} relu flags"
        )
    if x.dim() != 2 or x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"fused_mlp_head expects (B, {weights[0].shape[1]}); got {tuple(x.shape)}")
    if training and x.shape[0] < 2 and any(bn is not None for bn in norms):
        raise ValueError(f"BatchNorm needs more than 1 value per channel when training; got a batch of {x.shape[0]}")


# ------------------------------------------------------------------------------------------------------ module


@dataclass
class Layer:
    """Linear, then optionally BatchNorm1d, then optionally ReLU."""

    linear: nn.Linear
    bn: nn.BatchNorm1d | None
    relu: bool


class FusedMLPHead(nn.Sequential):
    """An nn.Sequential of Linear, BatchNorm1d and ReLU modules whose forward and backward run fused: the Triton
    kernels on CUDA, their PyTorch steps on CPU (see the module's docstring).

        head = FusedMLPHead(*eager_head)    # the same modules: same parameters, buffers and state_dict

    Each Linear may be followed by a BatchNorm1d (affine, with running statistics and a momentum) and then a
    ReLU; the last Linear by neither. Input (B, K) -> output (B, N_last).
    """

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self.plan = _plan(list(modules))

    def forward(self, x: Tensor) -> Tensor:
        return fused_mlp_head(
            x,
            [layer.linear.weight for layer in self.plan],
            [layer.linear.bias for layer in self.plan],
            [BatchNorm.of(layer.bn) if layer.bn is not None else None for layer in self.plan],
            [layer.relu for layer in self.plan],
            self.training,
        )


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
                raise ValueError(
                    "FusedMLPHead: BatchNorm1d needs affine=True, track_running_stats=True and a momentum (not None)"
                )
            layers[-1].bn = m
        elif isinstance(m, nn.ReLU) and layers and not layers[-1].relu:
            layers[-1].relu = True
        else:
            raise ValueError(
                f"FusedMLPHead fuses Linear [-> BatchNorm1d] [-> ReLU] chains; cannot place "
                f"{type(m).__name__} after {[type(x).__name__ for x in modules[: modules.index(m)]]}"
            )
    if not layers:
        raise ValueError("FusedMLPHead needs at least one Linear")
    if layers[-1].bn is not None or layers[-1].relu:
        raise ValueError("FusedMLPHead: the last Linear must have no BatchNorm1d or ReLU after it")
    for prev, layer in zip(layers, layers[1:]):
        if prev.linear.out_features != layer.linear.in_features:
            raise ValueError(f"FusedMLPHead: Linear widths do not chain: {prev.linear} then {layer.linear}")
    return layers
