"""FusedMLPHead and its ops fastreg::mlp_head_fwd and fastreg::mlp_head_bwd: on CPU the PyTorch steps (the ops' CPU
kernels) against float64 and eager PyTorch, torch.library.opcheck, torch.compile without a graph break, the Triton
kernels' writes as compile's analysis sees them; on a GPU the Triton kernels against eager PyTorch, under inductor
and in a CUDA graph. (The Triton kernels on CPU tensors: tests/interpret/test_mlp_head.py, under the interpreter.)"""

import copy

import pytest
import torch
from head_reference import (
    SHAPES,
    SPECS,
    assert_as_accurate_as_eager,
    assert_compiled_model_matches_float64,
    assert_equal,
    assert_matches_float64,
    assert_runs_equal,
    eager_head,
    run,
)
from helpers import LaunchRecorder, assert_compile_friendly_layout, tensors_compile_sees_written
from torch.export._trace import _disable_custom_triton_op_functional_decomposition as keep_triton_ops

from fastreg.kernels.mlp_head import FusedMLPHead, mlp_head_bwd, mlp_head_fwd

GPU_SHAPES = [(37, 24, 33), (256, 512, 2048), (1000, 96, 130)]  # (B, d, D) of a simreg4 head d -> 2d -> d -> 2d -> D


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SPECS)
def test_cpu_kernels_match_float64(kind, shape, dtype):
    """On CPU tensors FusedMLPHead runs its PyTorch steps (the ops' CPU kernels), no Triton."""
    assert_matches_float64(kind, shape, dtype)


def test_cpu_kernels_under_autocast_are_as_accurate_as_eager():
    """bf16 autocast over fp32 parameters: bf16 output, fp32 gradients, errors against float64 within eager's."""
    assert_as_accurate_as_eager((37, 24, 33), torch.bfloat16, "cpu")


def op_args(head: FusedMLPHead, x: torch.Tensor, training: bool) -> dict:
    """mlp_head_fwd's arguments for head's modules, as FusedMLPHead passes them."""
    layers, bns = head.plan, [layer.bn for layer in head.plan if layer.bn is not None]
    return dict(
        x=x,
        weights=[layer.linear.weight.detach() for layer in layers],
        biases=[layer.linear.bias.detach() for layer in layers],
        gammas=[bn.weight.detach() for bn in bns],
        betas=[bn.bias.detach() for bn in bns],
        running_means=[bn.running_mean for bn in bns],
        running_vars=[bn.running_var for bn in bns],
        counts=[bn.num_batches_tracked for bn in bns],
        has_bn=[layer.bn is not None for layer in layers],
        relu=[layer.relu for layer in layers],
        momentum=[bn.momentum for bn in bns],
        eps=[bn.eps for bn in bns],
        training=training,
        zs=[x.new_empty(len(x), layer.linear.out_features) for layer in layers],
        stats=[x.new_empty(4, bn.num_features) for bn in bns],
    )


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    """Schemas (the declared mutations included), fake kernels and aot_autograd dispatch of both ops, the CPU
    kernels running (kept whole: tracing them into their Triton kernels needs a GPU)."""
    fwd = op_args(FusedMLPHead(*eager_head("simreg4", 6, 5)), torch.randn(7, 6), training)
    with keep_triton_ops():
        torch.library.opcheck(mlp_head_fwd, (), fwd)
    mlp_head_fwd(**fwd)
    bwd = dict(
        grad_out=torch.randn(7, 5),
        x=fwd["x"],
        zs=fwd["zs"][:-1],
        weights=fwd["weights"],
        gammas=fwd["gammas"],
        stats=fwd["stats"],
        has_bn=fwd["has_bn"],
        relu=fwd["relu"],
        training=training,
        input_grad=True,
        param_dtype=torch.float32,
    )
    with keep_triton_ops():
        torch.library.opcheck(mlp_head_bwd, (), bwd)


def writes(name: str, kwargs: dict) -> set[str]:
    """What a launch of kernel `name` stores to, by its flags."""
    if name == "_linear_fwd_kernel":
        return {"Z"} | ({"PART"} if kwargs["STATS"] else set())
    if name == "_bn_stats_kernel":
        return {"STAT"} | ({"RUN_MEAN", "RUN_VAR", "COUNT"} if kwargs["TRAINING"] else set())
    if name == "_linear_dgrad_kernel":
        return {"DA"} | ({"PART"} if kwargs["HAS_STAT"] else set())
    return {"_bn_backward_kernel": {"DZ", "DGAMMA", "DBETA"}, "_linear_wgrad_kernel": {"DW", "DB"}}[name]


@pytest.mark.parametrize("training", [True, False])
def test_compile_sees_every_tensor_each_kernel_writes(monkeypatch, training):
    """Under compile, inductor clones and keeps what its analysis of each kernel's TTIR finds written (a written
    tensor it misses keeps stale contents). Every launch of a simreg4 head's forward and backward, as the ops make
    them: no None argument, pointers before scalars, and what the analysis sees written is what the kernel writes,
    nothing more, nothing less."""
    from fastreg.kernels import mlp_head

    launches = []
    monkeypatch.setattr(mlp_head, "wrap_triton", lambda kernel: LaunchRecorder(kernel, launches))
    fwd = op_args(FusedMLPHead(*eager_head("simreg4", 6, 5)), torch.randn(7, 6), training)
    mlp_head._forward(mlp_head.linear_forward, mlp_head.batch_norm_stats, *fwd.values())
    mlp_head._backward(
        mlp_head.linear_dgrad,
        mlp_head.batch_norm_backward,
        mlp_head.linear_wgrad,
        torch.randn(7, 5),
        fwd["x"],
        fwd["zs"][:-1],
        fwd["weights"],
        fwd["gammas"],
        fwd["stats"],
        fwd["has_bn"],
        fwd["relu"],
        training,
        True,
        torch.float32,
    )
    assert len(launches) == 6 + 10
    for kernel, kwargs in launches:
        name = getattr(kernel, "fn", kernel).__name__
        assert_compile_friendly_layout(kernel, kwargs)
        assert tensors_compile_sees_written(kernel, kwargs) == writes(name, kwargs), name


def test_compiles_without_a_graph_break():
    """On CPU the head runs its PyTorch steps as plain code, which compile traces (the ops would turn into Triton
    kernels, which cannot build for a CPU): no private switch needed."""
    assert_compiled_model_matches_float64("simreg4", steps=3)


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_fused_head_on_gpu_is_as_accurate_as_eager(shape, dtype):
    """The Triton kernels in fp32, and under bf16 autocast over fp32 parameters as in training, against eager
    PyTorch in the same precision, both against float64 (in bf16 neither is near float64: rounding z to bf16 flips
    hundreds of ReLU masks per BN layer)."""
    assert_as_accurate_as_eager(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiles_the_head_into_its_triton_kernels(dtype):
    """torch.compile(fullgraph=True) with inductor traces the ops into their Triton kernels (no fastreg op left in
    the generated code) and gives the uncompiled head's outputs, gradients and running statistics (updated once per
    step), step after step. Both take the fixed tiles (torch.use_deterministic_algorithms): with tiles autotuned
    apart, sums would run in other orders, and in bf16 one z rounded the other way can flip a ReLU mask."""
    from torch._inductor.utils import run_and_get_code

    eager = eager_head("simreg4", 64, 96).cuda()
    fused, compiled_head = FusedMLPHead(*copy.deepcopy(eager)), FusedMLPHead(*copy.deepcopy(eager))
    compiled = torch.compile(compiled_head, fullgraph=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for step in range(2):
            x, upstream = torch.randn(200, 64, device="cuda"), torch.randn(200, 96, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                want = run(fused, x, upstream)
                got, code = (
                    run_and_get_code(run, compiled, x, upstream) if step == 0 else (run(compiled, x, upstream), [])
                )
            if step == 0:  # the compiled forward and backward
                assert code and not any("torch.ops.fastreg" in c for c in code)
                assert any("_linear_fwd_kernel" in c for c in code) and any("_linear_wgrad_kernel" in c for c in code)
            assert_runs_equal(got, want, dtype, prefix="_orig_mod.")
            fused.zero_grad(), compiled_head.zero_grad()
            compiled_buffers = dict(compiled_head.named_buffers())
            for name, buf in fused.named_buffers():
                assert_equal(compiled_buffers[name], buf, dtype, buf.abs().max().item(), name)
            assert compiled_head[1].num_batches_tracked.item() == step + 1
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
def test_fused_head_is_captured_in_a_cuda_graph():
    """Forward and backward captured in one CUDA graph: a replay from the same state gives the eager fused run's
    output, gradients and running statistics bit for bit."""
    eager = eager_head("simreg4", 64, 96).cuda()
    head, reference = FusedMLPHead(*copy.deepcopy(eager)), FusedMLPHead(*copy.deepcopy(eager))
    state = copy.deepcopy(head.state_dict())
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    upstream = torch.randn(128, 96, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and compilation happen outside the capture
        for _ in range(2):
            head(x).backward(upstream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    head.zero_grad(set_to_none=True)  # backward allocates the .grad tensors in the graph's pool: replays rewrite them
    with torch.cuda.graph(graph):
        out = head(x)
        out.backward(upstream)
    head.load_state_dict(state)  # copies in place: the captured addresses stay
    graph.replay()
    torch.cuda.synchronize()
    want = run(reference, x, upstream)
    assert torch.equal(out, want[0]) and torch.equal(x.grad, want[1])
    assert all(torch.equal(p.grad, want[2][name]) for name, p in head.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(head.buffers(), reference.buffers()))
