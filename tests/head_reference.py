"""The reference for FusedMLPHead's tests (the interpreter suite, the CPU kernels and the GPU tests): the same
modules run as a plain nn.Sequential, in float64, and eager PyTorch in the same precision."""

import contextlib
import copy
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from fastreg.kernels.mlp_head import FusedMLPHead

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
# The fused head's error against float64 may be at most this many times eager PyTorch's in the same precision.
# (In bf16 no implementation is within TOL: rounding z to bf16 flips hundreds of ReLU masks per BN layer.)
NO_WORSE = 1.5
# ... pooled over batches of this many rows in all (max-abs: the mean over the batches of each one's; Frobenius: over
# all of them). In bf16 one ReLU mask that rounding flipped in one implementation, not the other, can decide a
# batch's max-abs error. The CPU kernels against CPU autocast (simreg4, 16 heads, B = 37): a single batch's max-abs
# up to 5x eager's, the largest over 8192 rows' batches up to 1.8x; pooled so, at most 1.07x (and 1.14x at B = 1000,
# Frobenius 0.9x).
POOLED_ROWS = 8192
# ... plus FLOOR[dtype] x the tensor's scale (max-abs; Frobenius: times sqrt(numel)). It decides only where eager's
# error is 0 (num_batches_tracked) or pure rounding noise (the bias of a Linear that BN follows, directly or through
# one more Linear: its exact gradient is 0), where a ratio of two noises means nothing. fp32: 1e-6, some 16 unit
# roundoffs, the noise of an fp32 sum of a few hundred terms; bf16 (and fp16): one unit roundoff, what rounding the
# largest value to that dtype once costs.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


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
    """(output, d x, {name: grad}) of one forward and backward (in the head's mode)."""
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


def errors(value: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs, Frobenius norm) of value - ref, in float64."""
    diff = value.double() - ref.double()
    return diff.abs().max().item(), diff.norm().item()


def module_scales(grads: dict) -> dict:
    """{parameter name: the largest gradient of its module}: a Linear's bias is its weight's column for a constant
    input 1, and its exact gradient may be 0 (before BN), so it is judged at the scale of the whole Linear's."""
    scales = {}
    for name, grad in grads.items():
        module = name.rpartition(".")[0]
        scales[module] = max(scales.get(module, 0.0), grad.abs().max().item())
    return {name: scales[name.rpartition(".")[0]] for name in grads}


@dataclass
class PooledErrors:
    """One tensor's errors against float64, batch by batch, of the fused head and of eager, and its scale."""

    fused: list = field(default_factory=list)  # (max-abs, Frobenius) per batch
    eager: list = field(default_factory=list)
    scale: float = 0.0
    numel: int = 0

    def add(self, fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, scale: float):
        self.fused.append(errors(fused, ref))
        self.eager.append(errors(eager, ref))
        self.scale, self.numel = max(self.scale, scale), self.numel + ref.numel()

    def assert_no_worse(self, dtype: torch.dtype, what: str):
        """The mean over the batches of the max-abs error, and the Frobenius norm over all of them."""

        def norms(errs: list) -> tuple[float, float]:
            return sum(e[0] for e in errs) / len(errs), sum(e[1] ** 2 for e in errs) ** 0.5

        floors = FLOOR[dtype] * self.scale, FLOOR[dtype] * self.scale * self.numel**0.5
        for norm, f, e, floor in zip(("max-abs", "Frobenius"), norms(self.fused), norms(self.eager), floors):
            assert f <= NO_WORSE * e + floor, (
                f"{what}: {norm} error {f:.3g} > {NO_WORSE} x eager's {e:.3g} + {floor:.3g}"
            )


def assert_as_accurate_as_eager(shape: tuple, dtype: torch.dtype, device: str):
    """A simreg4 FusedMLPHead and the eager head under the same autocast (bf16 over fp32 parameters, as in
    training) or in fp32, each against float64: for the output, d input, every parameter's gradient, every BN
    buffer and the eval() output after the step, the fused head's error is at most NO_WORSE x eager's plus
    FLOOR[dtype] x the tensor's scale, in the max-abs and the Frobenius norm pooled over training steps from the
    same state on batches of POOLED_ROWS rows in all. Also: the output's dtype is the GEMMs', the gradients fp32, and
    another fused head repeats the first bit for bit."""
    B, d, D = shape
    start, pooled = eager_head("simreg4", d, D).to(device), defaultdict(PooledErrors)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    for batch in range(-(-POOLED_ROWS // B)):
        eager, ref, fused = copy.deepcopy(start), copy.deepcopy(start).double(), FusedMLPHead(*copy.deepcopy(start))
        g = torch.Generator(device=device).manual_seed(batch)
        x = torch.randn(B, d, device=device, generator=g) * 2 + 1
        upstream = torch.randn(B, D, device=device, generator=g)
        with autocast():
            got, base = run(fused, x, upstream), run(eager, x, upstream)
            if batch == 0:
                assert_repeats(fused, got, FusedMLPHead(*copy.deepcopy(start)), x, upstream, dtype)
        exact = run(ref, x.double(), upstream.double())
        tensors = {"output": (got[0], base[0], exact[0]), "d input": (got[1], base[1], exact[1])}
        tensors |= {f"d {name}": (grad, base[2][name], exact[2][name]) for name, grad in got[2].items()}
        buffers = zip(fused.named_buffers(), eager.buffers(), ref.buffers())
        tensors |= {name: (buf, eager_buf, ref_buf) for (name, buf), eager_buf, ref_buf in buffers}
        with torch.no_grad(), autocast():
            tensors["eval output"] = (fused.eval()(x), eager.eval()(x), ref.eval()(x.double()))
        scales = module_scales(exact[2])
        for what, (f, e, r) in tensors.items():
            pooled[what].add(f, e, r, scales.get(what.removeprefix("d "), r.abs().max().item()))
    for what, errs in pooled.items():
        errs.assert_no_worse(dtype, what)


def assert_repeats(
    fused: FusedMLPHead, got: tuple, again: FusedMLPHead, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype
):
    """got, fused's `run` in the GEMMs' dtype, has fp32 gradients and is what another copy gives bit for bit."""
    assert got[0].dtype == dtype and all(grad.dtype == torch.float32 for grad in got[2].values())
    repeat = run(again, x, upstream)
    assert torch.equal(got[0], repeat[0]) and torch.equal(got[1], repeat[1]), "not deterministic"
    assert all(torch.equal(grad, repeat[2][name]) for name, grad in got[2].items()), "not deterministic"
    assert all(torch.equal(a, b) for a, b in zip(fused.buffers(), again.buffers())), "not deterministic"


def assert_equal(value: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float, what: str):
    """value and ref are one computation's results: equal up to FLOOR[dtype] x scale."""
    err = errors(value, ref)[0]
    assert err <= FLOOR[dtype] * scale, f"{what}: max difference {err:.3g} > {FLOOR[dtype]} x {scale:.3g}"


def assert_runs_equal(got: tuple, want: tuple, dtype: torch.dtype, prefix: str = ""):
    """Two `run` results of one computation (names in got may carry prefix), each tensor at its scale."""
    assert_equal(got[0], want[0], dtype, want[0].abs().max().item(), "output")
    assert_equal(got[1], want[1], dtype, want[1].abs().max().item(), "d input")
    scales = module_scales(want[2])
    for name, grad in got[2].items():
        name = name.removeprefix(prefix)
        assert_equal(grad, want[2][name], dtype, scales[name], f"d {name}")


def assert_matches_float64(kind: str, shape: tuple, dtype: torch.dtype):
    """FusedMLPHead (its ops' kernels for CPU tensors: the PyTorch steps, or Triton's under the interpreter) in
    dtype against the same modules in float64: one training step (output, gradients, running statistics), then
    the eval() output."""
    B, d, D = shape
    eager = eager_head(kind, d, D).to(dtype)
    ref, fused = copy.deepcopy(eager).double(), FusedMLPHead(*copy.deepcopy(eager))
    g = torch.Generator().manual_seed(B * d)
    x, upstream = (torch.randn(B, d, generator=g) * 2 + 1).to(dtype), torch.randn(B, D, generator=g)
    got = run(fused, x, upstream)
    assert_runs_near(got, run(ref, x.double(), upstream.double()), dtype)
    assert got[0].dtype == got[1].dtype == dtype and all(g.dtype == dtype for g in got[2].values())
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fused.named_buffers():  # running mean, unbiased running variance, num_batches_tracked
        assert_near(buf, ref_buffers[name], dtype, name)
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_near(fused(x), ref(x.double()), dtype, "eval output")


def assert_compiled_model_matches_float64(kind: str, steps: int = 2, context=contextlib.nullcontext):
    """A Linear trunk and a FusedMLPHead compiled as one graph (fullgraph=True fails on any graph break) with
    aot_eager, each call inside context(): each training step's output and gradients, the running statistics
    (updated once per step) and then the eval() output as a float64 eager model's, from one compiled frame per
    mode."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    trunk = nn.Linear(6, 8)
    fused = nn.Sequential(copy.deepcopy(trunk), FusedMLPHead(*eager_head(kind, 8, 5)))
    ref = nn.Sequential(copy.deepcopy(trunk), eager_head(kind, 8, 5)).double()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    for step in range(1, steps + 1):
        x, upstream = torch.randn(9, 6), torch.randn(9, 5)
        with context():
            got = run(compiled, x, upstream)
        assert_runs_near(got, run(ref, x.double(), upstream.double()), torch.float32, prefix="_orig_mod.")
        fused.zero_grad(), ref.zero_grad()
        ref_buffers = dict(ref.named_buffers())
        for name, buf in fused.named_buffers():
            assert_near(buf, ref_buffers[name], torch.float32, name)
            assert "num_batches_tracked" not in name or buf.item() == step, name
    compiled.eval(), ref.eval()
    with torch.no_grad(), context():
        assert_near(compiled(x), ref(x.double()), torch.float32, "eval output")
    assert counter.frame_count == 2  # train and eval: no recompilation between the steps
