"""fastreg.kernels' loss: the Triton kernels under the interpreter (a subprocess), the op's CPU implementation,
torch.compile integration (the kernel's argument layout as compile analyses it), and the kernels on a GPU.
FusedMLPHead's own tests: tests/test_mlp_head.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LaunchRecorder,
    assert_compile_friendly_layout,
    make_image_folder,
    tensors_compile_sees_written,
    tiny_overrides,
)

from fastreg.kernels.normalized_regression import (
    NormalizedRegressionLoss,
    normalized_regression_loss,
    normalized_regression_losses,
)

HERE = Path(__file__).resolve().parent


def reference(pred, target):
    return (F.normalize(pred.float(), dim=1) - F.normalize(target.float(), dim=1)).pow(2).sum(1).mean()


def step_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def test_trainer_with_triton_head_and_loss_under_the_interpreter_tracks_eager(tmp_path):
    """The convergence test: two epochs of a tiny Distiller (simreg4 head, with BN) with head.impl=triton and
    loss.impl=triton through the Triton interpreter, and with both eager, give the same loss at every step.
    fp32: the two sum in different orders, and at the tests' usual lr of 2.0 those rounding differences grow
    to 3e-3 relative by step 8; at 0.5 they stay small."""
    data = make_image_folder(tmp_path / "data", per_class=16)
    runs = {}
    for impl, env in (("triton", {"TRITON_INTERPRET": "1"}), ("eager", {})):
        out = tmp_path / impl
        args = tiny_overrides(data, out) + [
            "trainer.epochs=2",
            f"loss.impl={impl}",
            f"head.impl={impl}",
            "head.kind=simreg4",
            f"hydra.run.dir={out}",
            "optim.base_lr=0.5",
        ]
        proc = subprocess.run(
            [sys.executable, "-m", "fastreg.train", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=tmp_path,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[impl] = step_losses(out)
        log = (out / "train.log").read_text()
        assert log.count("fused Triton kernels (fastreg.kernels), interpreted") == (2 if impl == "triton" else 0)
    assert len(runs["triton"]) == len(runs["eager"]) == 8
    torch.testing.assert_close(torch.tensor(runs["triton"]), torch.tensor(runs["eager"]), rtol=1e-4, atol=1e-5)


def test_triton_kernels_under_the_interpreter():
    """TRITON_INTERPRET must be set before the kernel module is imported, hence a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpret")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (64, 512)])
def test_cpu_op_matches_autograd_reference(shape):
    pred, target = torch.randn(shape, requires_grad=True), torch.randn(shape)
    loss = NormalizedRegressionLoss()(pred, target)
    loss.backward()
    p = pred.detach().clone().requires_grad_()
    ref = reference(p, target)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred.grad, p.grad)


def test_compiles_without_a_graph_break():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward. CPU tensors take the plain
    PyTorch path (the registered op would become its Triton kernel, which cannot build for a CPU); on a GPU the
    op: test_triton_under_compile_on_gpu."""

    def step(pred, target):
        return normalized_regression_loss(pred * 2, target)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    pred, target = torch.randn(8, 40, requires_grad=True), torch.randn(8, 40)
    loss = compiled(pred, target)
    loss.backward()
    p = pred.detach().clone().requires_grad_()
    ref = reference(p * 2, target)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred.grad, p.grad)


@pytest.mark.parametrize("reduce", [True, False])
def test_registered_ops_pass_opcheck(reduce):
    """The ops' schemas, fake (meta) kernels, mutation declarations and autograd registration as torch checks
    them, through their CPU kernels; and compiled whole (the op kept, as torch.export keeps it) they give the
    plain path's results."""
    from torch.export._trace import _disable_custom_triton_op_functional_decomposition as keep_triton_ops

    import fastreg.kernels.normalized_regression as nr

    terms = multi_terms()
    args = (
        [p.detach() for p, _, _ in terms],
        [t for _, t, _ in terms],
        [w for _, _, w in terms],
        True,
        reduce,
        [True, False, True],
    )
    with keep_triton_ops():  # opcheck's aot_dispatch test would otherwise build the Triton kernel for a CPU
        torch.library.opcheck(nr.terms_loss_and_grad, args)
        torch.library.opcheck(nr.scale_, (torch.randn(5, 7), torch.rand(5)))
        out, grads = torch.compile(nr.terms_loss_and_grad, fullgraph=True, backend="aot_eager")(*args)
    want, want_grads = nr.eager_terms_loss_and_grad(*args)
    assert torch.equal(out, want) and all(torch.equal(g, w) for g, w in zip(grads, want_grads))


def test_grad_output_scales_and_autocast_inputs_accumulate_in_fp32():
    pred, target = torch.randn(6, 30, requires_grad=True), torch.randn(6, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = (pred * 1).to(torch.bfloat16)  # what a bf16 head gives
        rows = normalized_regression_loss(half, target.bfloat16(), reduction="none")
    assert rows.dtype == torch.float32
    upstream = torch.linspace(0.5, 2.0, 6)
    rows.backward(upstream)
    p = pred.detach().clone().requires_grad_()
    ref = (F.normalize(p.bfloat16().float(), dim=1) - F.normalize(target.bfloat16().float(), dim=1)).pow(2).sum(1)
    ref.backward(upstream)
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.grad, p.grad, atol=2e-2, rtol=2e-2)  # the gradient is stored in bf16


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        normalized_regression_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="weight"):
        normalized_regression_loss(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        normalized_regression_loss(torch.randn(3, 4), torch.randn(3, 4), reduction="max")
    with pytest.raises(ValueError, match="weight.detach"):
        normalized_regression_loss(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, requires_grad=True))


def multi_terms(device="cpu", dtype=torch.float32, batches=(3, 1, 5), dims=(7, 300, 4099)):
    """(pred, target, weight) per teacher: D past one 4096 block, odd B including 1, a weight on the middle term."""
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(b, d, generator=g).to(device, dtype).requires_grad_(),
            torch.randn(b, d, generator=g).to(device, dtype),
            torch.rand(b, generator=g).to(device) if k == 1 else None,
        )
        for k, (b, d) in enumerate(zip(batches, dims))
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_multi_terms_are_the_one_term_losses(reduction):
    terms = multi_terms()
    losses = normalized_regression_losses(terms, reduction)
    upstream = [torch.rand(loss.shape) + 0.5 for loss in losses]
    torch.autograd.backward(losses, upstream)
    for (pred, target, weight), loss, up in zip(terms, losses, upstream):
        p = pred.detach().clone().requires_grad_()
        one = normalized_regression_loss(p, target, weight, reduction)
        one.backward(up)
        assert torch.equal(loss, one) and torch.equal(pred.grad, p.grad)


def test_multi_terms_compile_without_a_graph_break():
    """As test_compiles_without_a_graph_break, for two terms of different D."""

    def step(p1, t1, p2, t2):
        a, b = normalized_regression_losses([(p1 * 2, t1, None), (p2, t2, None)])
        return a + 0.5 * b

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p1, t1 = torch.randn(8, 40, requires_grad=True), torch.randn(8, 40)
    p2, t2 = torch.randn(8, 24, requires_grad=True), torch.randn(8, 24)
    loss = compiled(p1, t1, p2, t2)
    loss.backward()
    q1, q2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
    ref = reference(q1 * 2, t1) + 0.5 * reference(q2, t2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(p1.grad, q1.grad)
    torch.testing.assert_close(p2.grad, q2.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_grad", [[True, True, True], [False, True, True], [True, False, True]])
def test_compile_sees_every_tensor_the_terms_kernel_writes(reduction, with_grad):
    """The launch of the GPU test that lost term 0's gradient under compile (B = 257, 257, 1; D = 7, 768, 8200):
    the output and exactly the gradients asked for are written, nothing else; every argument is a tensor or a
    number (no None), all pointers come before all scalars, and sizes are not specialized (a B of 1 is not
    turned into a constant)."""
    import fastreg.kernels.normalized_regression as nr

    terms = multi_terms(batches=(257, 257, 1), dims=(7, 768, 8200))
    launches = []
    nr._launch_terms(
        LaunchRecorder(nr._terms_kernel, launches),
        *map(list, zip(*terms)),
        reduction == "mean",
        reduction != "none",
        with_grad,
    )
    ((_, kwargs),) = launches
    assert_compile_friendly_layout(nr._terms_kernel, kwargs)
    assert {p.name for p in nr._terms_kernel.params if p.do_not_specialize} >= {"B0", "D0", "B2", "SP2", "ST3"}
    written = tensors_compile_sees_written(nr._terms_kernel, kwargs)
    assert written == {"OUT"} | {f"G{k}" for k, g in enumerate(with_grad) if g}


def test_compile_sees_the_scale_kernel_write_the_gradient():
    import fastreg.kernels.normalized_regression as nr

    launches = []
    nr._launch_scale(LaunchRecorder(nr._scale_kernel, launches), torch.randn(257, 7), torch.rand(257))
    ((_, kwargs),) = launches
    assert_compile_friendly_layout(nr._scale_kernel, kwargs)
    assert tensors_compile_sees_written(nr._scale_kernel, kwargs) == {"G"}


def test_multi_terms_bad_inputs_name_the_term():
    good = (torch.randn(3, 4), torch.randn(3, 4), None)
    with pytest.raises(ValueError, match=r"term 1: pred and target must both be \(B, D\)"):
        normalized_regression_losses([good, (torch.randn(3, 4), torch.randn(3, 5), None)])
    with pytest.raises(ValueError, match="term 2: weight"):
        normalized_regression_losses([good, good, (torch.randn(3, 4), torch.randn(3, 4), torch.ones(4))])
    with pytest.raises(ValueError, match="term 1: all terms must be on one device"):
        normalized_regression_losses([good, (torch.randn(3, 4, device="meta"), torch.randn(3, 4, device="meta"), None)])
    with pytest.raises(ValueError, match="term 0: reduction"):
        normalized_regression_losses([good], reduction="max")
    with pytest.raises(ValueError, match="empty"):
        normalized_regression_losses([])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 7), (257, 2048), (1024, 8200)])
def test_triton_on_gpu_matches_reference(shape, dtype, tol):
    pred = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    target = torch.randn(shape, device="cuda").to(dtype)
    loss = normalized_regression_loss(pred, target)
    loss.backward()
    p = pred.detach().float().requires_grad_()
    ref = reference(p, target)
    ref.backward()
    assert loss.dtype == torch.float32 and pred.grad.dtype == dtype
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(pred.grad.float(), p.grad, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_triton_under_compile_on_gpu():
    compiled = torch.compile(lambda p, t: normalized_regression_loss(p, t), fullgraph=True)
    pred, target = torch.randn(64, 256, device="cuda", requires_grad=True), torch.randn(64, 256, device="cuda")
    compiled(pred, target).backward()
    p = pred.detach().clone().requires_grad_()
    reference(p, target).backward()
    torch.testing.assert_close(pred.grad, p.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("compile", [False, True])
def test_multi_terms_on_gpu_are_the_one_term_losses(dtype, tol, compile):
    """One launch for three terms, eager and under torch.compile (the triton_op decomposed into its kernel)."""
    terms = multi_terms("cuda", dtype, batches=(257, 257, 1), dims=(7, 768, 8200))
    fn = torch.compile(normalized_regression_losses, fullgraph=True) if compile else normalized_regression_losses
    losses = fn(terms, "none")
    upstream = [torch.rand(loss.shape, device="cuda") + 0.5 for loss in losses]
    torch.autograd.backward(losses, upstream)
    wrong = []
    for k, ((pred, target, weight), loss, up) in enumerate(zip(terms, losses, upstream)):
        p = pred.detach().clone().requires_grad_()
        one = normalized_regression_loss(p, target, weight, "none")
        one.backward(up)
        for what, got, want, tol_k in (("loss", loss, one, 1e-6), ("grad", pred.grad.float(), p.grad.float(), tol)):
            if not torch.allclose(got, want, atol=tol_k, rtol=tol_k):
                wrong.append(f"term {k} {what}: max error {(got - want).abs().max().item():.3g}")
    assert not wrong, wrong  # every term checked, not only the first


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_scales_the_saved_gradient_on_gpu(dtype):
    """Inductor with the ops decomposed into their kernels: the in-place scale by a grad_output that is not 1
    (a weighted sum of two teachers' losses), against the same step uncompiled."""
    terms = multi_terms("cuda", dtype, batches=(64, 64), dims=(256, 2048))

    def step(terms):
        a, b = normalized_regression_losses(terms)
        return 0.3 * a + 0.7 * b

    loss = torch.compile(step, fullgraph=True)(terms)
    loss.backward()
    fresh = [(p.detach().clone().requires_grad_(), t, w) for p, t, w in terms]
    ref = step(fresh)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (pred, _, _), (p, _, _) in zip(terms, fresh):
        torch.testing.assert_close(pred.grad, p.grad, rtol=0, atol=0)  # the same kernels, row by row


@pytest.mark.gpu
def test_loss_forward_and_backward_replay_from_a_cuda_graph():
    """No host sync in forward or backward: the step captures into a CUDA graph, and a replay on new inputs
    gives that input's loss and gradient."""
    pred = torch.randn(256, 2048, device="cuda", requires_grad=True)
    target = torch.randn(256, 2048, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        normalized_regression_loss(pred, target).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    pred.grad = None
    with torch.cuda.graph(graph):
        loss = normalized_regression_loss(pred, target)
        loss.backward()
    with torch.no_grad():
        pred.copy_(torch.randn_like(pred))
        target.copy_(torch.randn_like(target))
    graph.replay()
    p = pred.detach().clone().requires_grad_()
    ref = reference(p, target)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad, p.grad, rtol=1e-5, atol=1e-7)
