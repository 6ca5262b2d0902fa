"""Teachers: every checkpoint layout loads exactly, projection heads, load errors, frozen behaviour, the registry.

Checkpoints are built from the real architectures (random torchvision/timm models) under each format's real key
names, and the teacher's features must equal those of the reference model holding the same weights. Where the
network itself is in question (MoCo-v3's 12-head ViT-S, BYOL's "SAME" padding, SwAV's RN50-w2 and its head), the
reference is a forward written out here with torch.nn.functional from the checkpoint's tensors. Tests of exact
loading run the network as loaded (teacher.inference=eager); the folded inference path (BatchNorm folded into the
convolutions, which changes rounding) has its own tests at the end, against the plain eval-mode network.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from fastreg.config import TeacherConfig
from fastreg.students import SmallCNN
from fastreg.teachers import TEACHERS, Conv2dSame, MaxPool2dSame, ResNet50Wide, _same_padding, build_teacher


def _jitter_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so a BN loaded from the wrong key changes the output."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
    return model


def _ref(model: nn.Module, conv: bool) -> nn.Module:
    # the teacher runs conv nets channels_last; the reference does too, so both take the same kernels
    return model.to(memory_format=torch.channels_last if conv else torch.contiguous_format).eval()


def _vit(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


def _moco_sincos(grid: int, dim: int) -> torch.Tensor:
    """MoCo-v3's pos_embed written from vits.py's recipe: meshgrid(w, h), [sin, cos] of each coordinate times
    omega = 1 / 10000^(d / (dim/4)), a zero row for the class token: (1, 1 + grid^2, dim)."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def _mocov3_vit_small() -> nn.Module:
    """A random MoCo-v3 ViT-S/16: timm's ViT with 12 heads, the sin-cos pos_embed, non-trivial norms and biases."""
    model = _vit("vit_small_patch16_224", num_heads=12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name == "cls_token":
                p.normal_(0, 0.1)
            elif "norm" in name:  # LayerNorm weights
                p.uniform_(0.5, 1.5)
        model.pos_embed.copy_(_moco_sincos(14, 384))
    return model


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = tvm.resnet50()
    model.fc = nn.Identity()
    return _ref(_jitter_bn(model), conv=True)


@pytest.fixture(scope="module")
def vit_small():
    torch.manual_seed(1)
    return _ref(_vit("vit_small_patch16_224"), conv=False)


@pytest.fixture(scope="module")
def vit_small_mocov3():
    torch.manual_seed(6)
    return _ref(_mocov3_vit_small(), conv=False)


@pytest.fixture(scope="module")
def dinov2_small():
    torch.manual_seed(2)
    return _ref(_vit("vit_small_patch14_dinov2"), conv=False)


@pytest.fixture(scope="module")
def cnn_small():
    torch.manual_seed(3)
    return _ref(_jitter_bn(SmallCNN((32, 64, 128))), conv=True)


# small inputs: (B, 3, H, W) that each reference accepts (ViTs: a few patches, thanks to dynamic_img_size)
INPUTS = {"resnet50": 32, "vit_small": 32, "vit_small_mocov3": 32, "dinov2_small": 28, "cnn_small": 16}


def _with(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _mocov3_mlp(dims: list[int]) -> nn.Sequential:
    """MoCo v3's _build_mlp: Linear(bias=False)-BN-ReLU ... Linear(bias=False)-BN(affine=False)."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        layers.append(nn.BatchNorm1d(d_out, affine=i < len(dims) - 2))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return _jitter_bn(nn.Sequential(*layers)).eval()


def _moco_v2_head(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 128)).eval()  # MoCo v2: 2048-2048-128


class _L2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def _swav_head(d: int) -> nn.Sequential:
    """SwAV's projection_head, then forward_head's L2 normalization (normalize=True): keys 0, 1 and 3."""
    return _jitter_bn(nn.Sequential(nn.Linear(d, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16), _L2())).eval()


def _simsiam_head(d: int) -> nn.Sequential:
    return _mocov3_mlp([d, 32, 32, 16])  # SimSiam's projector has MoCo v3's shape: 3 Linear, last BN affine=False


def _predictor() -> dict:
    return _with("module.predictor.", nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).state_dict())


def _moco(b: dict, h: dict) -> dict:
    sd = {**_with("encoder_q.", b), **_with("encoder_q.fc.", h), **_with("encoder_k.", b), **_with("encoder_k.fc.", h)}
    sd = {**_with("module.", sd), "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1).long()}
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def _seed_moco(b: dict, h: dict) -> dict:
    return {"state_dict": _with("module.encoder_q.", {**b, **_with("fc.", h)})}


def _mocov3(b: dict, h: dict, head: str) -> dict:
    sd = {**_with("base_encoder.", b), **_with(f"base_encoder.{head}.", h)}
    sd.update({**_with("momentum_encoder.", b), **_with(f"momentum_encoder.{head}.", h)})
    return {"epoch": 300, "state_dict": {**_with("module.", sd), **_predictor()}}


def _dino_full(b: dict, h: dict) -> dict:
    dino_head = {"head.mlp.0.weight": torch.randn(8, 384), "head.last_layer.weight_g": torch.ones(4, 1)}
    teacher = {**_with("backbone.", b), **dino_head}
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True)
    return {"student": _with("module.", teacher), "teacher": teacher, "args": args, "epoch": 100}


@dataclass
class Case:
    id: str
    arch: str  # fastreg teacher arch
    model: str  # fixture holding the reference backbone
    format: str  # its explicit teacher.format
    detected: str  # what format=auto must find
    make: Callable[[dict, dict], object]  # (backbone state_dict, head state_dict) -> the checkpoint as saved
    head: Callable[[int], nn.Module] | None = None  # the checkpoint's projection head, given the backbone width
    size: int = 0  # the input's side, if not INPUTS[model]


CASES = [
    Case(
        "torchvision",
        "resnet50",
        "resnet50",
        "torchvision",
        "torchvision",
        lambda b, h: {**b, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)},
    ),
    Case("moco_v2", "resnet50", "resnet50", "moco", "moco", _moco, _moco_v2_head),
    Case("moco_v1", "resnet50", "resnet50", "moco", "moco", _moco, lambda d: nn.Linear(d, 128)),
    # SEED's own MoCo-v2 teacher, jianfw_mocov2_ResNet50_epoch200.pth: only what SEED's tools/utils.py
    # load_moco_teacher_encoder reads, checkpoint["state_dict"]'s module.encoder_q.* with the fc.0-ReLU-fc.2 projection
    Case("seed_mocov2", "resnet50", "resnet50", "moco", "moco", _seed_moco, _moco_v2_head),
    Case(
        "mocov3_resnet",
        "resnet50",
        "resnet50",
        "mocov3",
        "mocov3",
        lambda b, h: _mocov3(b, h, "fc"),
        lambda d: _mocov3_mlp([d, 64, 64, 32]),
    ),
    Case(
        "swav",
        "resnet50",
        "resnet50",
        "swav",
        "swav",
        lambda b, h: {
            **_with("module.", b),
            **_with("module.projection_head.", h),
            "module.prototypes.weight": torch.randn(30, 16),
        },
        _swav_head,
    ),
    # byol-convert's output: torchvision's keys, fc = BYOL's online classifier. At 33 px every "SAME" pad is
    # symmetric, so byol_resnet50 computes exactly torchvision's ResNet-50 (test_byol_resnet50_pads_as_tensorflow)
    Case(
        "byol",
        "byol_resnet50",
        "resnet50",
        "byol",
        "torchvision",
        lambda b, h: {**b, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)},
        size=33,
    ),
    Case(
        "simsiam",
        "resnet50",
        "resnet50",
        "simsiam",
        "simsiam",
        lambda b, h: {"state_dict": {**_with("module.encoder.", b), **_with("module.encoder.fc.", h), **_predictor()}},
        _simsiam_head,
    ),
    Case("dino_full", "vit_small_patch16", "vit_small", "dino", "dino", _dino_full),
    Case("dino_released", "vit_small_patch16", "vit_small", "dino", "torchvision", lambda b, h: b),
    Case(
        "mocov3_vit",
        "vit_small_mocov3",
        "vit_small_mocov3",
        "mocov3",
        "mocov3",
        lambda b, h: _mocov3(b, h, "head"),
        lambda d: _mocov3_mlp([d, 64, 64, 32]),
    ),
    # MoCo-v3's convert_to_deit.py: base_encoder's keys without the head, plain, under "model"
    Case(
        "mocov3_vit_deit",
        "vit_small_mocov3",
        "vit_small_mocov3",
        "torchvision",
        "torchvision",
        lambda b, h: {"model": b},
    ),
    Case(
        "dinov2_hub",
        "vit_small_patch14_dinov2",
        "dinov2_small",
        "dinov2",
        "dinov2",
        lambda b, h: {"mask_token": torch.zeros(1, 384), **b},
    ),
    Case(
        "dinov2_train",
        "vit_small_patch14_dinov2",
        "dinov2_small",
        "dinov2",
        "dinov2",
        lambda b, h: {
            "teacher": {
                **_with("backbone.", {"mask_token": torch.zeros(1, 384), **b}),
                "dino_head.mlp.0.weight": torch.randn(8, 384),
                "ibot_head.mlp.0.weight": torch.randn(8, 384),
            }
        },
    ),
    Case(
        "demo_cnn",
        "cnn_small",
        "cnn_small",
        "torchvision",
        "torchvision",
        lambda b, h: {**b, "fc.weight": torch.randn(10, 128), "fc.bias": torch.randn(10)},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_checkpoint_layout_loads_exact_weights(case, request, tmp_path, caplog):
    torch.manual_seed(4)
    ref = request.getfixturevalue(case.model)
    head = case.head(TEACHERS[case.arch].dim) if case.head else None
    path = tmp_path / "teacher.pth"
    torch.save(case.make(ref.state_dict(), head.state_dict() if head else {}), path)
    size = case.size or INPUTS[case.model]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled = ref(x)

    caplog.set_level(logging.INFO, logger="fastreg.teachers")
    for fmt in ("auto", case.format):
        teacher = build_teacher(TeacherConfig(inference="eager", arch=case.arch, checkpoint=str(path), format=fmt))
        assert torch.equal(teacher(x), pooled), fmt
        assert teacher.dim == pooled.shape[1]
    assert f"(format {case.detected}, detected)" in caplog.text

    if head is None:
        with pytest.raises(ValueError, match="no projection head"):
            build_teacher(TeacherConfig(inference="eager", arch=case.arch, checkpoint=str(path), projection=True))
        return
    teacher = build_teacher(
        TeacherConfig(inference="eager", arch=case.arch, checkpoint=str(path), format=case.format, projection=True)
    )
    with torch.no_grad():
        projected = head(pooled)
    torch.testing.assert_close(teacher(x), projected, rtol=0, atol=0)
    assert teacher.dim == projected.shape[1]


def test_mocov3_momentum_encoder(vit_small_mocov3, tmp_path):
    torch.manual_seed(5)
    momentum = _mocov3_vit_small().eval()
    sd = _with("module.base_encoder.", vit_small_mocov3.state_dict())
    sd.update(_with("module.momentum_encoder.", momentum.state_dict()))
    path = str(tmp_path / "mocov3.pth")
    torch.save({"state_dict": sd}, path)
    x = torch.randn(2, 3, 32, 32)
    for use_momentum, ref in ((False, vit_small_mocov3), (True, momentum)):
        cfg = TeacherConfig(arch="vit_small_mocov3", checkpoint=path, momentum_encoder=use_momentum)
        with torch.no_grad():
            assert torch.equal(build_teacher(cfg)(x), ref(x))
    with pytest.raises(ValueError, match="momentum_encoder"):
        build_teacher(TeacherConfig(arch="vit_small_mocov3", checkpoint=path, format="dino", momentum_encoder=True))


def _mocov3_vit_small_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """MoCo-v3's ViT-S/16 written out (moco-v3 vits.py vit_small on timm's VisionTransformer): patch-embed conv,
    [cls; patches] + pos_embed, 12 pre-norm blocks of 12-head attention softmax(q k^T / sqrt(32)) v and a GELU MLP,
    the final LayerNorm (eps 1e-6), the CLS token. (B, 3, 224, 224) -> (B, 384)."""
    dim, heads = 384, 12

    def norm(t, name):
        return F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)  # (B, 384, 14, 14)
    t = t.flatten(2).transpose(1, 2)  # (B, 196, 384): row-major patches
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1) + sd["pos_embed"]  # (B, 197, 384)
    b, n, _ = t.shape
    for i in range(12):
        p = f"blocks.{i}."
        qkv = linear(norm(t, p + "norm1"), p + "attn.qkv").reshape(b, n, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, 12, 197, 32)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)  # (B, 12, 197, 197)
        t = t + linear((attn @ v).transpose(1, 2).reshape(b, n, dim), p + "attn.proj")
        t = t + linear(F.gelu(linear(norm(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return norm(t, "norm")[:, 0]


def test_mocov3_vit_small_equals_mocov3s_forward(vit_small_mocov3, tmp_path):
    """The teacher from a MoCo-v3 checkpoint computes the hand-written 12-head forward (float64) at 224 px, where
    the stored pos_embed is used as is; the 6-head split (timm's ViT-S) gives another output."""
    sd = vit_small_mocov3.state_dict()
    torch.save(_mocov3(sd, _mocov3_mlp([384, 64, 64, 32]).state_dict(), "head"), tmp_path / "mocov3.pth")
    teacher = build_teacher(TeacherConfig(arch="vit_small_mocov3", checkpoint=str(tmp_path / "mocov3.pth")))
    x = torch.randn(2, 3, 224, 224)
    expected = _mocov3_vit_small_forward({k: v.double() for k, v in sd.items()}, x.double())
    torch.testing.assert_close(teacher(x), expected.float(), rtol=1e-4, atol=1e-4)
    six_heads = _vit("vit_small_patch16_224").eval()
    six_heads.load_state_dict(sd)
    with torch.no_grad():
        assert not torch.allclose(six_heads(x), expected.float(), rtol=1e-2, atol=1e-2)


def test_untrained_vit_small_mocov3_has_mocov3s_pos_embed():
    model = build_teacher(TeacherConfig(arch="vit_small_mocov3", checkpoint="random")).backbone
    assert model.blocks[0].attn.num_heads == 12
    torch.testing.assert_close(model.pos_embed, _moco_sincos(14, 384), rtol=0, atol=1e-6)


def test_mocov3_vit_small_weights_are_refused_by_the_6_head_vit(vit_small_mocov3, tmp_path):
    """Same key shapes, other attention split: MoCo-v3's layout, or its sin-cos pos_embed in plain keys, tells."""
    sd = vit_small_mocov3.state_dict()
    torch.save(_mocov3(sd, {}, "head"), tmp_path / "mocov3.pth")
    torch.save({"model": sd}, tmp_path / "deit.pth")  # convert_to_deit.py
    for path, shown_by in (("mocov3.pth", "its layout says so"), ("deit.pth", "its fixed sin-cos pos_embed says so")):
        with pytest.raises(
            ValueError,
            match=f"MoCo-v3 ViT-S weights \\({shown_by}\\).*12 attention heads.*Set teacher.arch=vit_small_mocov3",
        ):
            build_teacher(TeacherConfig(arch="vit_small_patch16", checkpoint=str(tmp_path / path)))


def test_dino_vit_small_weights_are_refused_by_vit_small_mocov3(vit_small, tmp_path):
    torch.save(_dino_full(vit_small.state_dict(), {}), tmp_path / "dino_full.pth")
    torch.save(vit_small.state_dict(), tmp_path / "dino_released.pth")  # learned pos_embed, plain keys
    for path, shown_by in (("dino_full.pth", "layout"), ("dino_released.pth", "pos_embed")):
        with pytest.raises(
            ValueError,
            match=f"does not hold MoCo-v3 ViT-S weights \\(its {shown_by} is not .*set teacher.arch=vit_small_patch16",
        ):
            build_teacher(TeacherConfig(arch="vit_small_mocov3", checkpoint=str(tmp_path / path)))


def _tf_same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """x padded as TensorFlow's "SAME" for kernel k, stride s: per side total = max((ceil(n/s) - 1) s + k - n, 0),
    total // 2 before and the rest after."""
    pad = []
    for n in reversed(x.shape[-2:]):  # F.pad takes (left, right, top, bottom)
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad, value=value)


def test_same_padding_by_hand():
    """Worked out on paper: ResNet-50's stem, max-pool and a stride-2 3x3 at 224 px, and where they are symmetric."""
    assert _same_padding(224, 7, 2) == (2, 3) and _same_padding(225, 7, 2) == (3, 3)
    assert _same_padding(112, 3, 2) == (0, 1) and _same_padding(113, 3, 2) == (1, 1)
    assert _same_padding(56, 3, 1) == (1, 1) and _same_padding(56, 1, 2) == (0, 0) and _same_padding(57, 1, 2) == (0, 0)


@pytest.mark.parametrize("size", [(32, 32), (33, 33), (32, 33), (7, 8)])
@pytest.mark.parametrize("k, s", [(7, 2), (3, 2), (3, 1), (1, 2), (1, 1)])
def test_same_padded_conv_and_max_pool_equal_hand_padded_ops(size, k, s):
    torch.manual_seed(7)
    x = torch.randn(2, 4, *size)
    conv = Conv2dSame(4, 6, k, s, bias=False)
    torch.testing.assert_close(conv(x), F.conv2d(_tf_same_pad(x, k, s), conv.weight, stride=s))
    if k > 1:
        pool = MaxPool2dSame(k, s)
        x = x - 10  # all negative: a zero-padded max-pool would differ from TF's -inf padding
        torch.testing.assert_close(pool(x), F.max_pool2d(_tf_same_pad(x, k, s, -math.inf), k, s))


def _resnet50_forward(sd: dict, x: torch.Tensor, conv: Callable, maxpool: Callable) -> torch.Tensor:
    """A ResNet-50 (v1.5: stride on the 3x3) written out from a state_dict with torchvision's keys, at any width;
    conv(x, weight, stride) and maxpool(x) carry the padding under test. (B, 3, H, W) -> (B, 2048 * width)."""

    def bn(t, name):
        return F.batch_norm(
            t,
            sd[f"{name}.running_mean"],
            sd[f"{name}.running_var"],
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    x = maxpool(F.relu(bn(conv(x, sd["conv1.weight"], 2), "bn1")))
    for i, blocks in enumerate((3, 4, 6, 3), start=1):
        for j in range(blocks):
            p, stride = f"layer{i}.{j}.", 2 if i > 1 and j == 0 else 1
            out = F.relu(bn(conv(x, sd[p + "conv1.weight"], 1), p + "bn1"))
            out = F.relu(bn(conv(out, sd[p + "conv2.weight"], stride), p + "bn2"))
            out = bn(conv(out, sd[p + "conv3.weight"], 1), p + "bn3")
            shortcut = bn(conv(x, sd[p + "downsample.0.weight"], stride), p + "downsample.1") if j == 0 else x
            x = F.relu(out + shortcut)
    return x.mean(dim=(2, 3))


def _tf_conv(x, w, s):
    return F.conv2d(_tf_same_pad(x, w.shape[-1], s), w, stride=s)


def _tf_maxpool(x):
    return F.max_pool2d(_tf_same_pad(x, 3, 2, -math.inf), 3, 2)


def test_byol_resnet50_pads_as_tensorflow(resnet50, tmp_path):
    """byol_resnet50 equals a hand-padded ResNet-50 at even and odd sizes, and torchvision's only where every
    "SAME" pad is symmetric (33 px: 33, 17, 9, 5, 3 are odd), not at 32 px."""
    sd = resnet50.state_dict()
    torch.save(sd, tmp_path / "byol.pth")
    teacher = build_teacher(
        TeacherConfig(inference="eager", arch="byol_resnet50", checkpoint=str(tmp_path / "byol.pth"), format="byol")
    )
    for size in (32, 33, 40):
        x = torch.randn(2, 3, size, size)
        expected = _resnet50_forward(sd, x, _tf_conv, _tf_maxpool)
        torch.testing.assert_close(teacher(x), expected, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(resnet50(x), expected, rtol=1e-4, atol=1e-5) == (size == 33), size


def test_byol_weights_need_byol_resnet50(resnet50, tmp_path, caplog):
    torch.save(resnet50.state_dict(), tmp_path / "byol.pth")
    path = str(tmp_path / "byol.pth")
    with pytest.raises(
        ValueError,
        match=r"\(format byol\) does not fit teacher.arch=resnet50: BYOL.*TF 'SAME' padding"
        r".*teacher.arch=byol_resnet50.*SimSiam: teacher.format=simsiam",
    ):
        build_teacher(TeacherConfig(arch="resnet50", checkpoint=path, format="byol"))
    with caplog.at_level(logging.INFO, logger="fastreg.teachers"):
        build_teacher(TeacherConfig(arch="resnet50", checkpoint=path))  # the keys cannot tell: loads, and says so
    assert "plain ResNet-50 keys; if these are BYOL's converted weights" in caplog.text
    assert "teacher.arch=byol_resnet50" in caplog.text


def _swav_resnet50w2_checkpoint(gen: torch.Generator) -> dict:
    """A random SwAV RN50-w2 checkpoint as released (swav_RN50w2_400ep_pretrain.pth.tar): module.* keys, shapes from
    facebookresearch/swav src/resnet50.py resnet50w2 (every width doubled, bottleneck width = planes), its
    projection_head Linear(4096, 8192)-BN-ReLU-Linear(8192, 128) (--hidden_mlp 8192 --feat_dim 128) and 3000
    prototypes."""
    sd = {}

    def conv(name, c_out, c_in, k):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=gen) * math.sqrt(2 / (c_in * k * k))

    def bn(name, c):
        sd.update(
            {
                f"{name}.weight": torch.rand(c, generator=gen) + 0.5,
                f"{name}.bias": 0.1 * torch.randn(c, generator=gen),
                f"{name}.running_mean": 0.1 * torch.randn(c, generator=gen),
                f"{name}.running_var": torch.rand(c, generator=gen) + 0.5,
                f"{name}.num_batches_tracked": torch.tensor(1000),
            }
        )

    conv("conv1", 128, 3, 7)
    bn("bn1", 128)
    inplanes = 128
    for i, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 128 * 2 ** (i - 1)
        for j in range(blocks):
            p = f"layer{i}.{j}."
            conv(p + "conv1", planes, inplanes if j == 0 else 4 * planes, 1)
            bn(p + "bn1", planes)
            conv(p + "conv2", planes, planes, 3)
            bn(p + "bn2", planes)
            conv(p + "conv3", 4 * planes, planes, 1)
            bn(p + "bn3", 4 * planes)
            if j == 0:
                conv(p + "downsample.0", 4 * planes, inplanes, 1)
                bn(p + "downsample.1", 4 * planes)
        inplanes = 4 * planes
    sd["projection_head.0.weight"] = torch.randn(8192, 4096, generator=gen) / 64
    sd["projection_head.0.bias"] = 0.1 * torch.randn(8192, generator=gen)
    bn("projection_head.1", 8192)
    sd["projection_head.3.weight"] = torch.randn(128, 8192, generator=gen) / 90
    sd["projection_head.3.bias"] = 0.1 * torch.randn(128, generator=gen)
    sd["prototypes.weight"] = torch.randn(3000, 128, generator=gen)
    return {f"module.{k}": v for k, v in sd.items()}


def _swav_conv(x, w, s):
    if w.shape[-1] == 7:  # SwAV's stem: self.padding = ConstantPad2d(1, 0.0), then conv1 with padding=2
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), w, stride=s, padding=2)
    return F.conv2d(x, w, stride=s, padding=w.shape[-1] // 2)


def test_swav_resnet50w2_checkpoint_equals_swavs_forward(tmp_path):
    """SEED's deeper SwAV teacher: resnet50x2 + format swav loads SwAV's w2 checkpoint; pooled, it equals SwAV's
    forward_backbone, and with projection=true forward_head with normalize=True (the output SEED distills)."""
    ckpt = _swav_resnet50w2_checkpoint(torch.Generator().manual_seed(8))
    torch.save(ckpt, tmp_path / "swav_w2.pth")
    sd = {k.removeprefix("module."): v for k, v in ckpt.items()}
    x = torch.randn(2, 3, 40, 40)
    pooled = _resnet50_forward(sd, x, _swav_conv, lambda t: F.max_pool2d(t, 3, 2, padding=1))  # (2, 4096)
    h = F.relu(
        F.batch_norm(
            pooled @ sd["projection_head.0.weight"].T + sd["projection_head.0.bias"],
            sd["projection_head.1.running_mean"],
            sd["projection_head.1.running_var"],
            sd["projection_head.1.weight"],
            sd["projection_head.1.bias"],
            training=False,
            eps=1e-5,
        )
    )
    projected = F.normalize(h @ sd["projection_head.3.weight"].T + sd["projection_head.3.bias"], dim=1)  # (2, 128)

    cfg = TeacherConfig(arch="resnet50x2", checkpoint=str(tmp_path / "swav_w2.pth"))
    teacher = build_teacher(cfg)
    assert teacher.dim == 4096
    # random weights grow the residual stream to ~1e4: float32 sums agree to ~1e-6 of that scale; a stem padded
    # by 2 instead of 3 is off by ~1e-1 of it
    torch.testing.assert_close(teacher(x), pooled, rtol=1e-4, atol=1e-5 * pooled.abs().max().item())
    del teacher
    teacher = build_teacher(TeacherConfig(arch="resnet50x2", checkpoint=cfg.checkpoint, format="swav", projection=True))
    assert teacher.dim == 128
    torch.testing.assert_close(teacher(x), projected, rtol=1e-4, atol=1e-5)


def test_simclr_converter_checkpoint(resnet50, tmp_path, monkeypatch):
    """The wide ResNet keeps torchvision's names: at width 1 a converter-style checkpoint gives torchvision's output."""
    monkeypatch.setitem(TEACHERS, "resnet50x1", TEACHERS["resnet50"]._replace(build=lambda: ResNet50Wide(1)))
    fc = {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}  # the converter keeps its linear head
    torch.save({"state_dict": {**resnet50.state_dict(), **fc}}, tmp_path / "simclr.pth")
    x = torch.randn(2, 3, 32, 32)
    teacher = build_teacher(
        TeacherConfig(inference="eager", arch="resnet50x1", checkpoint=str(tmp_path / "simclr.pth"))
    )
    with torch.no_grad():
        assert torch.equal(teacher(x), resnet50(x))


def _demo_checkpoint(cnn_small: nn.Module, path, drop: tuple = (), **extra) -> str:
    sd = {k: v for k, v in cnn_small.state_dict().items() if k not in drop}
    torch.save({**sd, "fc.weight": torch.randn(10, 128), "fc.bias": torch.randn(10), **extra}, path)
    return str(path)


def test_missing_backbone_key_is_an_error(cnn_small, tmp_path):
    path = _demo_checkpoint(cnn_small, tmp_path / "demo.pth", drop=("features.4.running_var",))
    with pytest.raises(ValueError) as err:
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=path))
    for words in ("features.4.running_var", "1 backbone keys are missing", path, "format torchvision, detected"):
        assert words in str(err.value)
    assert "teacher.format=" in str(err.value)


def test_wrong_layout_lists_missing_keys(cnn_small, tmp_path):
    path = _demo_checkpoint(cnn_small, tmp_path / "demo.pth")
    with pytest.raises(ValueError, match=r"(?s)format moco\).*30 backbone keys are missing.*features\.0\.weight"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=path, format="moco"))


def test_unexpected_and_misshaped_keys_are_errors(cnn_small, tmp_path):
    path = _demo_checkpoint(cnn_small, tmp_path / "extra.pth", **{"features.99.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="not in the backbone: features.99.weight"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=path))
    torch.save(SmallCNN((16, 32, 64)).state_dict(), tmp_path / "tiny.pth")  # the demo's student, not its teacher
    with pytest.raises(ValueError, match=r"wrong shape.*features\.0\.weight \(16, 3, 3, 3\) vs \(32, 3, 3, 3\)"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(tmp_path / "tiny.pth")))


def test_unknown_layout_is_an_error(tmp_path):
    torch.save({"encoder.layers.0.weight": torch.ones(2)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"no known layout.*encoder\.layers\.0\.weight.*format=<torchvision\|moco"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(tmp_path / "odd.pth")))


def test_a_seed_distillation_checkpoint_is_not_a_teacher(tmp_path):
    """SEED's README lists its distilled students (resnet18_distill_resnet50-moco-v2-checkpoint_0199.pth.tar, ...)
    beside its teachers; main.py saves the whole SEED module, the frozen teacher's copy included, under DDP's module."""
    student, teacher = SmallCNN((16, 32, 64)), SmallCNN((32, 64, 128))
    sd = {**_with("student.", student.state_dict()), **_with("teacher.", teacher.state_dict())}
    sd = {**_with("module.", sd), "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1).long()}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, tmp_path / "distilled.pth.tar")
    with pytest.raises(ValueError) as err:
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(tmp_path / "distilled.pth.tar")))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "distilled.pth.tar") in message
    assert "distillation run's (student.* next to teacher.* keys" in message and "point teacher.checkpoint" in message


def test_unreadable_checkpoints_name_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(missing)))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt is a text file, not a PyTorch checkpoint"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(tmp_path / "notes.txt")))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="empty.pth holds no state_dict"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(tmp_path / "empty.pth")))


def test_ignored_keys_are_logged(cnn_small, tmp_path, caplog):
    path = _demo_checkpoint(cnn_small, tmp_path / "demo.pth")
    with caplog.at_level(logging.INFO, logger="fastreg.teachers"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint=path))
    assert "ignored 2 checkpoint keys, under: fc (2)" in caplog.text


def test_old_and_half_precision_checkpoints_load(cnn_small, tmp_path):
    """Pre-0.4.1 checkpoints lack num_batches_tracked; some releases are fp16. Both load, and run in fp32."""
    sd = {
        k: v.half() if v.is_floating_point() else v
        for k, v in cnn_small.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(sd, tmp_path / "old.pth")
    teacher = build_teacher(TeacherConfig(inference="eager", arch="cnn_small", checkpoint=str(tmp_path / "old.pth")))
    x = torch.randn(2, 3, 16, 16)
    ref = SmallCNN((32, 64, 128))
    ref.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(teacher(x), _ref(ref.float(), conv=True)(x))


def test_random_teacher_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fastreg.teachers"):
        teacher = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random"))
    assert "UNTRAINED" in caplog.text
    assert teacher(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    with pytest.raises(ValueError, match="projection head"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", projection=True))


def test_teacher_is_frozen_and_its_output_feeds_a_loss():
    teacher = build_teacher(
        TeacherConfig(inference="eager", arch="cnn_small", checkpoint="random", name="t0"), amp_dtype=torch.bfloat16
    )
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (teacher.name, teacher.arch, teacher.dim) == ("t0", "cnn_small", 128)

    before = teacher.backbone.features[1].running_mean.clone()
    feat = teacher(torch.randn(4, 3, 16, 16))
    assert feat.dtype == torch.float32 and not feat.requires_grad and not feat.is_inference()
    assert torch.equal(teacher.backbone.features[1].running_mean, before)  # BN stayed in eval
    student = torch.randn(4, 128, requires_grad=True)
    loss = ((student - feat) ** 2).mean()
    loss.backward()  # the teacher's output can be saved for backward
    torch.testing.assert_close(student.grad, 2 * (student - feat).detach() / student.numel())


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="teacher.arch='resnet9000' is not one of resnet50"):
        build_teacher(TeacherConfig(arch="resnet9000", checkpoint="random"))


@pytest.mark.parametrize("arch", list(TEACHERS))
def test_registered_arch_pools_to_its_dim(arch):
    build, dim, conv = TEACHERS[arch]
    with torch.device("meta"):  # shapes only: resnet50x4 and ViT-B cost nothing
        out = build()(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, dim)


def test_wide_resnets_are_simclrs():
    """SimCLR's table: ResNet-50 (2x) 94M and (4x) 375M parameters; torchvision's names, for the converter."""
    names = set(TEACHERS["resnet50"].build().state_dict())
    for width, params in ((2, 94e6), (4, 375e6)):
        with torch.device("meta"):
            model = ResNet50Wide(width)
        assert abs(sum(p.numel() for p in model.parameters()) / params - 1) < 0.01
        assert set(model.state_dict()) == names
        assert model.layer4[-1].conv3.weight.shape == (2048 * width, 512 * width, 1, 1)


def random_batch_norms(model: nn.Module, seed: int = 1) -> None:
    """Running statistics and affine parameters away from BatchNorm's (0, 1) defaults, so folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


CONV_TEACHERS = [arch for arch, spec in TEACHERS.items() if spec.conv]


@pytest.mark.parametrize("arch", CONV_TEACHERS)
def test_folded_teacher_gives_the_eval_models_features(arch):
    """Every registered conv teacher, random weights and BatchNorm statistics, fp32: every BatchNorm is folded
    (none left in the network) and the features equal the plain eval-mode network's to float32 rounding
    (relative to the largest feature: random deep ResNets grow their residual stream to 1e9)."""
    plain = build_teacher(TeacherConfig(arch=arch, checkpoint="random", inference="eager"))
    random_batch_norms(plain)
    folded = copy.deepcopy(plain)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert folded.fold() == n_bn and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last
    )
    want, got = plain(x), folded(x)
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()


@pytest.mark.parametrize("arch", ["cnn_small", "resnet50", "byol_resnet50"])
def test_folded_teacher_in_bf16_is_as_accurate_as_autocast(arch):
    """Stored and run in bf16 without autocast, its features are about as close to fp32's as the unfolded network
    under bf16 autocast: Frobenius error within 1.5x, the largest error within 2.5x (one bf16 rounding of a few
    features decides it)."""
    fp32 = build_teacher(TeacherConfig(arch=arch, checkpoint="random", inference="eager"))
    random_batch_norms(fp32)
    autocast = copy.deepcopy(fp32)
    autocast.amp_dtype = torch.bfloat16
    folded = copy.deepcopy(autocast)
    folded.fold()
    assert next(folded.backbone.parameters()).dtype == torch.bfloat16
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last
    )
    want = fp32(x)
    eager_err, folded_err = autocast(x) - want, folded(x) - want
    assert folded_err.norm() <= 1.5 * eager_err.norm()
    assert folded_err.abs().max() <= 2.5 * eager_err.abs().max()


def test_build_teacher_folds_conv_nets_only(caplog):
    with caplog.at_level("INFO"):
        cnn = build_teacher(
            TeacherConfig(arch="cnn_small", checkpoint="random", inference="folded"), amp_dtype=torch.bfloat16
        )
        vit = build_teacher(TeacherConfig(arch="vit_small_patch16", checkpoint="random", inference="folded"))
        eager = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", inference="eager"))
        auto = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random"))  # auto: folded on CUDA only
    assert cnn.backbone_dtype == torch.bfloat16 and not any(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())
    assert vit.backbone_dtype is None and eager.backbone_dtype is None and auto.backbone_dtype is None
    assert "teacher.inference=auto on cpu" in caplog.text
    assert "6 BatchNorms folded into their convolutions, weights in torch.bfloat16" in caplog.text
    assert "a transformer: no BatchNorm to fold" in caplog.text


def test_folding_needs_eval_mode():
    from fastreg.teacher_inference import fold_batch_norms

    with pytest.raises(ValueError, match="eval"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())


def test_a_batch_norm_after_a_shared_conv_output_is_not_folded():
    """Folding rewrites the conv's output; if something else reads it too, the BatchNorm stays."""
    from fastreg.teacher_inference import conv_bn_pairs

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.conv(x)
            return self.bn(z) + z

    assert conv_bn_pairs(Branch()) == []
    assert conv_bn_pairs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))) == [("0", "1")]


def test_compiled_folded_teacher_gives_the_folded_features():
    """teacher.compile: the folded backbone through inductor with freezing, in one graph (fullgraph: a break is an
    error), gives the folded network's features."""
    folded = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", inference="folded"))
    compiled = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", compile=True))  # auto: folds
    compiled.backbone._orig_mod.load_state_dict(folded.backbone.state_dict())  # before the first call compiles
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(x), folded(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="teacher.inference=folded or auto"):
        TeacherConfig(arch="cnn_small", inference="eager", compile=True)
