"""FusedMLPHead's Triton kernels under the interpreter (TRITON_INTERPRET=1, set by tests/test_kernels.py before
this process imports them), against the same modules run as a plain nn.Sequential in float64. fp32 and fp16: the
interpreter's tl.dot misreads bf16 operands (Triton 3.8), so bf16 is checked on a GPU (tests/test_mlp_head.py)."""

import copy
import os

import pytest
import torch
from torch import nn
from torch.export._trace import _disable_custom_triton_op_functional_decomposition as keep_triton_ops

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

from head_reference import (  # noqa: E402
    SHAPES,
    SPECS,
    assert_compiled_model_matches_float64,
    assert_matches_float64,
    assert_runs_near,
    eager_head,
    run,
)

from fastreg.kernels import mlp_head  # noqa: E402
from fastreg.kernels.mlp_head import FusedMLPHead  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SPECS)
def test_forward_backward_and_running_stats_match_eager(kind, shape, dtype):
    assert_matches_float64(kind, shape, dtype)


def test_eval_mode_backward_uses_the_running_statistics():
    eager = eager_head("simreg4", 6, 10)
    eager.train()(torch.randn(9, 6) * 3)  # running statistics away from (0, 1)
    ref, fused = copy.deepcopy(eager).double().eval(), FusedMLPHead(*copy.deepcopy(eager)).eval()
    x, upstream = torch.randn(5, 6), torch.randn(5, 10)
    assert_runs_near(run(fused, x, upstream), run(ref, x.double(), upstream.double()), torch.float32)
    torch.testing.assert_close(fused.state_dict(), eager.state_dict())  # eval() leaves the statistics alone


def test_results_repeat_bit_for_bit():
    """The BN statistics and gradient sums are partials reduced in a fixed order: no run-to-run noise."""
    eager = eager_head("simreg4", 24, 33)
    x, upstream = torch.randn(70, 24), torch.randn(70, 33)
    first, second = (run(FusedMLPHead(*copy.deepcopy(eager)), x, upstream) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][n], second[2][n]) for n in first[2])


def test_the_state_dict_is_the_eager_heads():
    eager = eager_head("simreg4", 8, 12)
    fused = FusedMLPHead(*eager_head("simreg4", 8, 12, seed=1))
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), eager.eval()(x), atol=1e-5, rtol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        FusedMLPHead(*eager_head("mlp2_bn", 4, 5))(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expects \\(B, 4\\)"):
        FusedMLPHead(*eager_head("mlp2_bn", 4, 5))(torch.randn(3, 5))
    with pytest.raises(ValueError, match="last Linear"):
        FusedMLPHead(nn.Linear(4, 5), nn.ReLU())
    with pytest.raises(ValueError, match="cannot place BatchNorm1d"):
        FusedMLPHead(nn.Linear(4, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="momentum"):
        FusedMLPHead(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="do not chain"):
        FusedMLPHead(nn.Linear(4, 5), nn.Linear(6, 2))


def test_runs_inside_a_compiled_model():
    """torch.compile(fullgraph=True) traces the trunk and the head's ops into one graph. The interpreter runs
    kernels on real tensors only, so the ops stay whole in the graph (tracing them into their Triton kernels, as
    inductor does on a GPU, would hand the interpreter fake tensors) and run the interpreted kernels there."""
    assert_compiled_model_matches_float64("mlp2_bn", context=keep_triton_ops)


def test_deterministic_algorithms_take_the_fixed_tiles(monkeypatch):
    """Autotuning picks tiles by timing; under torch.use_deterministic_algorithms the GEMMs take fixed ones."""
    launched = []

    def spy(kernel, name):
        launch = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: launched.append(name) or launch(*args, **kwargs))

    for name in ("fwd", "dgrad", "wgrad"):
        spy(getattr(mlp_head, f"_linear_{name}_fixed"), name)
    eager = eager_head("simreg4", 24, 33)
    x, upstream = torch.randn(70, 24), torch.randn(70, 33)
    tuned = run(FusedMLPHead(*copy.deepcopy(eager)), x, upstream)
    assert not launched
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    fixed = run(FusedMLPHead(*copy.deepcopy(eager)), x, upstream)
    assert sorted(set(launched)) == ["dgrad", "fwd", "wgrad"]
    assert torch.equal(tuned[0], fixed[0]) and torch.equal(tuned[1], fixed[1])  # the interpreter has one config
