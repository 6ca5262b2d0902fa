"""Teachers: every checkpoint layout loads exactly, projection heads, load errors, frozen behaviour, the registry.

Checkpoints are built from the real architectures (random torchvision/timm models) under each format's real key
names, and the teacher's features must equal those of the reference model holding the same weights.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import timm
import torch
from torch import nn
from torchvision import models as tvm

from fastreg.config import TeacherConfig
from fastreg.students import SmallCNN
from fastreg.teachers import TEACHERS, ResNet50Wide, build_teacher


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


def _vit(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)


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
def dinov2_small():
    torch.manual_seed(2)
    return _ref(_vit("vit_small_patch14_dinov2"), conv=False)


@pytest.fixture(scope="module")
def cnn_small():
    torch.manual_seed(3)
    return _ref(_jitter_bn(SmallCNN((32, 64, 128))), conv=True)


# small inputs: (B, 3, H, W) that each reference accepts (ViTs: a few patches, thanks to dynamic_img_size)
INPUTS = {"resnet50": 32, "vit_small": 32, "dinov2_small": 28, "cnn_small": 16}


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


def _swav_head(d: int) -> nn.Sequential:
    return _jitter_bn(nn.Sequential(nn.Linear(d, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))).eval()


def _simsiam_head(d: int) -> nn.Sequential:
    return _mocov3_mlp([d, 32, 32, 16])  # SimSiam's projector has MoCo v3's shape: 3 Linear, last BN affine=False


def _predictor() -> dict:
    return _with("module.predictor.", nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).state_dict())


def _moco(b: dict, h: dict) -> dict:
    sd = {**_with("encoder_q.", b), **_with("encoder_q.fc.", h), **_with("encoder_k.", b), **_with("encoder_k.fc.", h)}
    sd = {**_with("module.", sd), "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1).long()}
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


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
    head: Optional[Callable[[int], nn.Module]] = None  # the checkpoint's projection head, given the backbone width


CASES = [
    Case("torchvision", "resnet50", "resnet50", "torchvision", "torchvision",
         lambda b, h: {**b, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}),
    Case("moco_v2", "resnet50", "resnet50", "moco", "moco", _moco, _moco_v2_head),
    Case("moco_v1", "resnet50", "resnet50", "moco", "moco", _moco, lambda d: nn.Linear(d, 128)),
    Case("mocov3_resnet", "resnet50", "resnet50", "mocov3", "mocov3",
         lambda b, h: _mocov3(b, h, "fc"), lambda d: _mocov3_mlp([d, 64, 64, 32])),
    Case("swav", "resnet50", "resnet50", "swav", "swav",
         lambda b, h: {**_with("module.", b), **_with("module.projection_head.", h),
                       "module.prototypes.weight": torch.randn(30, 16)}, _swav_head),
    Case("byol", "resnet50", "resnet50", "byol", "torchvision", lambda b, h: _with("module.", b)),
    Case("simsiam", "resnet50", "resnet50", "byol", "byol",
         lambda b, h: {"state_dict": {**_with("module.encoder.", b), **_with("module.encoder.fc.", h), **_predictor()}},
         _simsiam_head),
    Case("dino_full", "vit_small_patch16", "vit_small", "dino", "dino", _dino_full),
    Case("dino_released", "vit_small_patch16", "vit_small", "dino", "torchvision", lambda b, h: b),
    Case("mocov3_vit", "vit_small_patch16", "vit_small", "mocov3", "mocov3",
         lambda b, h: _mocov3(b, h, "head"), lambda d: _mocov3_mlp([d, 64, 64, 32])),
    Case("dinov2_hub", "vit_small_patch14_dinov2", "dinov2_small", "dinov2", "dinov2",
         lambda b, h: {"mask_token": torch.zeros(1, 384), **b}),
    Case("dinov2_train", "vit_small_patch14_dinov2", "dinov2_small", "dinov2", "dinov2",
         lambda b, h: {"teacher": {**_with("backbone.", {"mask_token": torch.zeros(1, 384), **b}),
                                   "dino_head.mlp.0.weight": torch.randn(8, 384),
                                   "ibot_head.mlp.0.weight": torch.randn(8, 384)}}),
    Case("demo_cnn", "cnn_small", "cnn_small", "torchvision", "torchvision",
         lambda b, h: {**b, "fc.weight": torch.randn(10, 128), "fc.bias": torch.randn(10)}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_checkpoint_layout_loads_exact_weights(case, request, tmp_path, caplog):
    torch.manual_seed(4)
    ref = request.getfixturevalue(case.model)
    head = case.head(TEACHERS[case.arch].dim) if case.head else None
    path = tmp_path / "teacher.pth"
    torch.save(case.make(ref.state_dict(), head.state_dict() if head else {}), path)
    x = torch.randn(2, 3, INPUTS[case.model], INPUTS[case.model])
    with torch.no_grad():
        pooled = ref(x)

    caplog.set_level(logging.INFO, logger="fastreg.teachers")
    for fmt in ("auto", case.format):
        teacher = build_teacher(TeacherConfig(arch=case.arch, checkpoint=str(path), format=fmt))
        assert torch.equal(teacher(x), pooled), fmt
        assert teacher.dim == pooled.shape[1]
    assert f"(format {case.detected}, detected)" in caplog.text

    if head is None:
        with pytest.raises(ValueError, match="no projection head"):
            build_teacher(TeacherConfig(arch=case.arch, checkpoint=str(path), projection=True))
        return
    teacher = build_teacher(TeacherConfig(arch=case.arch, checkpoint=str(path), format=case.format, projection=True))
    with torch.no_grad():
        projected = head(pooled)
    torch.testing.assert_close(teacher(x), projected, rtol=0, atol=0)
    assert teacher.dim == projected.shape[1]


def test_mocov3_momentum_encoder(vit_small, tmp_path):
    torch.manual_seed(5)
    momentum = _vit("vit_small_patch16_224").eval()
    sd = _with("module.base_encoder.", vit_small.state_dict())
    sd.update(_with("module.momentum_encoder.", momentum.state_dict()))
    path = str(tmp_path / "mocov3.pth")
    torch.save({"state_dict": sd}, path)
    x = torch.randn(2, 3, 32, 32)
    for use_momentum, ref in ((False, vit_small), (True, momentum)):
        cfg = TeacherConfig(arch="vit_small_patch16", checkpoint=path, momentum_encoder=use_momentum)
        with torch.no_grad():
            assert torch.equal(build_teacher(cfg)(x), ref(x))
    with pytest.raises(ValueError, match="momentum_encoder"):
        build_teacher(TeacherConfig(arch="vit_small_patch16", checkpoint=path, format="dino", momentum_encoder=True))


def test_simclr_converter_checkpoint(resnet50, tmp_path, monkeypatch):
    """The wide ResNet keeps torchvision's names: at width 1 a converter-style checkpoint gives torchvision's output."""
    monkeypatch.setitem(TEACHERS, "resnet50x1", TEACHERS["resnet50"]._replace(build=lambda: ResNet50Wide(1)))
    fc = {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}  # the converter keeps its linear head
    torch.save({"state_dict": {**resnet50.state_dict(), **fc}}, tmp_path / "simclr.pth")
    x = torch.randn(2, 3, 32, 32)
    teacher = build_teacher(TeacherConfig(arch="resnet50x1", checkpoint=str(tmp_path / "simclr.pth")))
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
    sd = {k: v.half() if v.is_floating_point() else v for k, v in cnn_small.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    teacher = build_teacher(TeacherConfig(arch="cnn_small", checkpoint=str(tmp_path / "old.pth")))
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
    teacher = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", name="t0"), amp_dtype=torch.bfloat16)
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
