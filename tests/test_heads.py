import pytest
import torch
from torch import nn

from fastreg.config import HeadConfig
from fastreg.heads import build_head


def layout(head: nn.Sequential) -> list:
    return [
        (
            type(m).__name__,
            getattr(m, "in_features", getattr(m, "num_features", None)),
            getattr(m, "out_features", None),
        )
        for m in head
    ]


def test_simreg4_is_the_official_head():
    d, D = 512, 2048
    assert layout(build_head(HeadConfig(kind="simreg4"), d, D)) == [
        ("Linear", d, 2 * d),
        ("BatchNorm1d", 2 * d, None),
        ("ReLU", None, None),
        ("Linear", 2 * d, d),
        ("Linear", d, 2 * d),
        ("BatchNorm1d", 2 * d, None),
        ("ReLU", None, None),
        ("Linear", 2 * d, D),
    ]


def test_seed_linear_and_two_layer_heads():
    assert layout(build_head(HeadConfig(kind="seed"), 64, 128)) == [
        ("Linear", 64, 64),
        ("ReLU", None, None),
        ("Linear", 64, 128),
    ]
    assert layout(build_head(HeadConfig(kind="linear"), 64, 128)) == [("Linear", 64, 128)]
    # SimReg's 2-layer head has no BN or ReLU (mlp_arch.py: only n_layers == 4 adds them); mlp2_bn does
    assert layout(build_head(HeadConfig(kind="mlp2"), 64, 10)) == [("Linear", 64, 128), ("Linear", 128, 10)]
    assert layout(build_head(HeadConfig(kind="mlp2_bn"), 64, 10)) == [
        ("Linear", 64, 128),
        ("BatchNorm1d", 128, None),
        ("ReLU", None, None),
        ("Linear", 128, 10),
    ]


def test_generic_mlp_switches():
    head = build_head(HeadConfig(kind="mlp", hidden=[32, 16], bn=False, relu=True), 8, 4)
    assert layout(head) == [
        ("Linear", 8, 32),
        ("ReLU", None, None),
        ("Linear", 32, 16),
        ("ReLU", None, None),
        ("Linear", 16, 4),
    ]
    assert head(torch.randn(5, 8)).shape == (5, 4)


def test_bad_head_config():
    with pytest.raises(ValueError, match="head.hidden"):
        HeadConfig(kind="mlp")
    with pytest.raises(ValueError, match="head.kind"):
        HeadConfig(kind="mlp3")


def test_head_impl_choice(caplog):
    """auto: eager on CPU; triton on CPU: the fused op's PyTorch CPU kernel (its Triton kernels: tests/interpret)."""
    from fastreg.kernels import FusedMLPHead

    cpu = torch.device("cpu")
    with caplog.at_level("INFO"):
        assert type(build_head(HeadConfig(kind="mlp2"), 8, 4, cpu)) is nn.Sequential
        assert type(build_head(HeadConfig(kind="mlp2", impl="triton"), 8, 4, cpu)) is FusedMLPHead
    assert "eager PyTorch (head.impl=auto: eager on cpu)" in caplog.text
    assert "fused op, its PyTorch CPU kernel" in caplog.text


def test_head_impl_auto_on_a_gpu_follows_the_committed_wins(monkeypatch):
    """On CUDA, auto picks the fused head only for a (GPU, dtype) in HEAD_WINS, and says why either way."""
    import fastreg.kernel_choice as fused

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    assert fused.head_auto(cuda, torch.bfloat16) == (
        False,
        "head.impl=auto: eager, no committed benchmark shows the "
        "fused head faster than eager on NVIDIA H200 in bf16 "
        "(fastreg.kernel_choice.HEAD_WINS; head.impl=triton forces it)",
    )
    monkeypatch.setattr(fused, "HEAD_WINS", frozenset({("NVIDIA H200", "bf16")}))
    assert fused.head_auto(cuda, torch.bfloat16)[0] and not fused.head_auto(cuda, torch.float32)[0]

    with pytest.raises(ValueError, match="head.impl"):
        HeadConfig(impl="fused")


def test_head_wins_are_what_the_committed_benchmarks_show():
    """HEAD_WINS holds exactly the (GPU, dtype) where a committed kernels benchmark timed under CUDA graphs
    (meta.device_time) found the fused head faster than eager at every head shape; older files (no capture)
    cannot add a win."""
    import json
    from pathlib import Path

    from fastreg.kernel_choice import HEAD_WINS

    wins = set()
    for path in (Path(__file__).resolve().parents[1] / "benchmarks" / "results").rglob("kernels_*.json"):
        result = json.loads(path.read_text())
        if "device_time" not in result["meta"]:
            continue
        by_case: dict[tuple[str, str], list[bool]] = {}
        for shape in result["head_wins"]:
            by_case.setdefault((shape["gpu"], shape["dtype"]), []).append(shape["faster"])
        wins |= {case for case, faster in by_case.items() if all(faster)}
    assert set(HEAD_WINS) == wins
