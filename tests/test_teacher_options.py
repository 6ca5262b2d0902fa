"""The teacher's own options: which tokens make a ViT's feature, the side it sees, and the dtype it is stored in.

References are written out here: timm's model run by hand (forward_features, one F.interpolate) and the same
teacher in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastreg import teachers
from fastreg.config import TeacherConfig
from fastreg.teachers import build_teacher


def _random(arch: str, **keys) -> teachers.Teacher:
    torch.manual_seed(0)
    return build_teacher(TeacherConfig(arch=arch, checkpoint="random", **keys))


@pytest.mark.parametrize("arch", ["vit_small_patch16", "vit_small_patch14_dinov2"])
def test_cls_is_timms_own_class_token_output(arch):
    """For the ViTs timm pools by the class token, feature=cls is what timm's forward gives: nothing changed."""
    teacher = _random(arch)
    x = torch.randn(2, 3, 112, 112)  # a multiple of 14 and 16
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), teacher.backbone(x), rtol=0, atol=0)


def test_dinov3_cls_is_the_class_token_not_timms_average():
    """timm's DINOv3 models pool by the patch average; the teacher's cls is token 0 of the normed tokens."""
    teacher = _random("vit_small_patch16_dinov3")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = teacher.backbone.forward_features(x)  # (2, 1 + 4 storage + 4 patches, 384)
        torch.testing.assert_close(teacher(x), tokens[:, 0], rtol=0, atol=0)
        assert not torch.allclose(teacher(x), teacher.backbone(x))


@pytest.mark.parametrize("arch, side", [("cnn_small", 24), ("vit_small_patch14_reg4_dinov2", 28)])
def test_input_size_resizes_once_on_the_device(arch, side):
    teacher = _random(arch, input_size=side)
    x = torch.randn(2, 3, 40, 40)
    resized = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        plain = _random(arch)  # the same seed: the same weights
        torch.testing.assert_close(teacher(x), plain(resized))
        torch.testing.assert_close(teacher(resized), plain(resized), rtol=0, atol=0)  # the right size: untouched
        assert not torch.allclose(teacher(x), plain(F.interpolate(x, size=(side, side))))  # not nearest


def test_input_size_must_be_positive():
    with pytest.raises(ValueError, match="teacher.input_size must be > 0"):
        TeacherConfig(input_size=0)


def test_feature_and_dtype_are_checked():
    with pytest.raises(ValueError, match="teacher.feature='avg' is not one of cls, cls_avgpool"):
        TeacherConfig(feature="avg")
    with pytest.raises(ValueError, match="teacher.dtype='fp16' is not one of auto, fp32, bf16"):
        TeacherConfig(dtype="fp16")


def test_cls_avgpool_needs_a_vits_tokens():
    with pytest.raises(ValueError, match="cls_avgpool pools a vision transformer's tokens; a conv net has none"):
        _random("cnn_small", feature="cls_avgpool")


@pytest.mark.parametrize(
    "arch, dtype, amp, stored",
    [
        ("vit_small_patch16_dinov3", "auto", torch.bfloat16, torch.bfloat16),  # "big" (threshold lowered below)
        ("vit_small_patch16_dinov3", "auto", None, None),  # an fp32 run keeps fp32
        ("vit_small_patch16_dinov3", "fp32", torch.bfloat16, None),
        ("cnn_small", "auto", torch.bfloat16, None),  # conv nets: folded or autocast, never this
        ("cnn_small", "bf16", None, torch.bfloat16),
    ],
)
def test_dtype_auto_stores_big_transformers_in_bf16(arch, dtype, amp, stored, monkeypatch):
    monkeypatch.setattr(teachers, "BIG_TEACHER_PARAMS", 10**6)  # ViT-S (22M) stands in for ViT-g and the 7B
    torch.manual_seed(0)
    cfg = TeacherConfig(arch=arch, checkpoint="random", dtype=dtype, inference="eager")
    teacher = build_teacher(cfg, amp_dtype=amp)
    assert teacher.backbone_dtype == stored
    assert {p.dtype for p in teacher.backbone.parameters()} == {stored or torch.float32}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = teacher(x)
        torch.manual_seed(0)
        reference = build_teacher(TeacherConfig(arch=arch, checkpoint="random", dtype="fp32", inference="eager"))(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.1)  # bf16 keeps 8 bits


def test_a_folded_conv_teacher_is_stored_in_teacher_dtype():
    """Folding stores the weights too: in teacher.dtype=bf16, not back in the run's fp32; folded from fp32 weights."""
    torch.manual_seed(0)
    cfg = TeacherConfig(arch="cnn_small", checkpoint="random", dtype="bf16", inference="folded")
    teacher = build_teacher(cfg, amp_dtype=None)
    assert teacher.backbone_dtype == torch.bfloat16
    assert {p.dtype for p in teacher.backbone.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.backbone.modules())


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch16_dinov3"])
def test_dino_teachers_attend_with_sdpa(arch, monkeypatch):
    """One fused scaled_dot_product_attention per block (flash / memory-efficient kernels on a GPU), the same
    attention class as their ViT-g and 7B."""
    teacher, calls = _random(arch), []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    teacher(torch.randn(1, 3, 112, 112))
    assert len(calls) == len(teacher.backbone.blocks)


def _resampled_pos_embed(arch: str, side: int, channel0: torch.Tensor) -> torch.Tensor:
    """Channel 0 of a DINOv2 teacher's position embedding at input_size=side, given its 37 x 37 source values."""
    torch.manual_seed(0)
    vit = build_teacher(TeacherConfig(arch=arch, checkpoint="random")).backbone
    with torch.no_grad():
        vit.pos_embed[0, -37 * 37 :, 0] = channel0.flatten()
    teachers.resample_as_dinov2(vit, side)
    grid = side // 14
    return vit.pos_embed[0, -grid * grid :, 0].reshape(grid, grid).detach()


def _bicubic_1d(values: torch.Tensor, x: float, a: float = -0.75) -> float:
    """Cubic convolution (Keys, a = -0.75 as PyTorch's bicubic) of a 1-D sequence at coordinate x, written out."""

    def weight(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    base = math.floor(x)
    return sum(values[base + k].item() * weight(x - base - k) for k in range(-1, 3))


def test_dinov2_without_registers_resamples_its_position_embedding_as_dinov2_does():
    """DINOv2's interpolate_pos_encoding samples row i of the 16 x 16 grid at the source coordinate
    (i + 0.5) * 37 / (16 + 0.1) - 0.5 (scale factor (16 + 0.1) / 37, no antialiasing); timm's at
    (i + 0.5) * 37 / 16 - 0.5, antialiased. Channel 0 varies along the rows only, so each row of the result is the
    1-D cubic convolution of the source column at that coordinate."""
    source = torch.randn(37, generator=torch.Generator().manual_seed(1))
    rows = source[:, None].expand(37, 37)
    grid = _resampled_pos_embed("vit_small_patch14_dinov2", 224, rows)  # (16, 16)
    for i in range(2, 14):  # away from the border, where bicubic clamps the indices
        expected = _bicubic_1d(source, (i + 0.5) * 37 / 16.1 - 0.5)
        assert grid[i, 8].item() == pytest.approx(expected, abs=1e-5)
    assert grid[8, 8].item() != pytest.approx(_bicubic_1d(source, 8.5 * 37 / 16 - 0.5), abs=1e-3)


def test_the_dinov2_teacher_at_its_input_size_resamples_nothing_more(monkeypatch):
    torch.manual_seed(0)
    teacher = _random("vit_small_patch14_dinov2", input_size=224)
    assert teacher.backbone.pos_embed.shape == (1, 1 + 16 * 16, 384)
    import timm.models.vision_transformer as timm_vit

    sizes, resample = [], timm_vit.resample_abs_pos_embed
    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", lambda p, **k: sizes.append(k) or resample(p, **k))
    teacher(torch.randn(1, 3, 224, 224))
    assert [tuple(k["new_size"]) == tuple(k["old_size"]) for k in sizes] == [True]  # a no-op


def test_registers_models_keep_timms_resampling():
    """DINOv2 with registers was made with antialiasing and no offset: timm's own resampling, left alone."""
    torch.manual_seed(0)
    teacher = _random("vit_small_patch14_reg4_dinov2", input_size=224)
    assert teacher.backbone.pos_embed.shape == (1, 37 * 37, 384)
