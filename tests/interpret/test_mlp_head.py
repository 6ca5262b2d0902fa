"""FusedMLPHead's Triton kernels under the interpreter (TRITON_INTERPRET=1, set by tests/test_kernels.py before
this process imports them), against the same modules run as a plain nn.Sequential in float64. fp32 and fp16."""

import copy
import os

import pytest
import torch
from torch import nn

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

from fastreg.kernels.mlp_head import FusedMLPHead  # noqa: E402
from head_reference import SHAPES, SPECS, assert_near, assert_runs_near, eager_head, run  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SPECS)
def test_forward_backward_and_running_stats_match_eager(kind, shape, dtype):
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
    """torch.compile leaves the fused head whole (torch.compiler.disable) and compiles around it."""
    torch.manual_seed(0)
    trunk = nn.Linear(6, 8)
    fused_model = nn.Sequential(copy.deepcopy(trunk), FusedMLPHead(*eager_head("mlp2_bn", 8, 5)))
    ref_model = nn.Sequential(copy.deepcopy(trunk), eager_head("mlp2_bn", 8, 5)).double()
    compiled = torch.compile(fused_model, backend="aot_eager")
    x, upstream = torch.randn(9, 6), torch.randn(9, 5)
    assert_runs_near(run(compiled, x, upstream), run(ref_model, x.double(), upstream.double()), torch.float32,
                     prefix="_orig_mod.")
