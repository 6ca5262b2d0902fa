"""DINOv2 / DINOv3 teachers load from the official checkpoint layouts, and refuse the wrong ones.

The checkpoints are synthetic: the official key names and shapes (tests/dino_checkpoints.py, written from the
official code) with seeded random values. The reference for each is timm's own model given the same weights through
timm's own checkpoint filter (strict), and its class token after the final norm: forward_features(x)[:, 0].
The real networks are used at their smallest size (ViT-S, S+); the large ones (L, g, H+, 7B) are checked for key
names and shapes on the meta device only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import re

import pytest
import timm
import torch
from dino_checkpoints import (
    OFFICIAL,
    dinov2_training,
    dinov3_training,
    official_state_dict,
    rope_periods,
    with_spec,
)
from timm.models import eva
from timm.models import vision_transformer as vit

from fastreg.config import TeacherConfig
from fastreg.teachers import TEACHERS, build_teacher, vit_feature

DIMS = {  # the registry dims (issue 25's, and the two DINOv2 ViTs registered before it)
    "vit_small_patch14_dinov2": 384,
    "vit_base_patch14_dinov2": 768,
    "vit_large_patch14_dinov2": 1024,
    "vit_giant_patch14_dinov2": 1536,
    "vit_small_patch14_reg4_dinov2": 384,
    "vit_base_patch14_reg4_dinov2": 768,
    "vit_large_patch14_reg4_dinov2": 1024,
    "vit_giant_patch14_reg4_dinov2": 1536,
    "vit_small_patch16_dinov3": 384,
    "vit_small_plus_patch16_dinov3": 384,
    "vit_base_patch16_dinov3": 768,
    "vit_large_patch16_dinov3": 1024,
    "vit_huge_plus_patch16_dinov3": 1280,
    "vit_7b_patch16_dinov3": 4096,
}
SMALL = ("vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3")


def _timm_filter(arch: str):
    return eva.checkpoint_filter_fn if arch.endswith("_dinov3") else vit.checkpoint_filter_fn


def timm_reference(arch: str, hub: dict) -> torch.nn.Module:
    """timm's model holding `hub` (the official hub layout) through timm's own checkpoint filter, strictly; a DINOv2
    one built at the checkpoint's resolution (its pos_embed's grid x the patch: 518 for the hub, a training run's crop
    for its checkpoint), so that the forward resamples the position embedding once, as DINOv2's own does."""
    size = {}
    if "pos_embed" in hub:
        size = {"img_size": math.isqrt(hub["pos_embed"].shape[1] - 1) * OFFICIAL[arch].patch}
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **size)
    with contextlib.redirect_stdout(io.StringIO()):  # eva's filter prints a line per block it drops a qkv bias of
        weights = _timm_filter(arch)(dict(hub), model)  # dict(): timm's DINOv2 converter pops keys
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _images(arch: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    side = 4 * OFFICIAL[arch].patch  # a 4 x 4 patch grid: the DINOv2 pos_embed is resampled, as for any crop
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _teacher(arch: str, path, fmt: str = "auto", **kw):
    return build_teacher(TeacherConfig(arch=arch, checkpoint=str(path), format=fmt, **kw))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Each official layout loads, and the teacher is timm's model holding the same weights


def _hub(arch: str, **changes):
    def make(seed: int):
        hub = official_state_dict(with_spec(arch, **changes), seed)
        return hub, hub  # the hub .pth is the plain state_dict

    return make


LAYOUTS = {
    # id: (teacher.arch, format, (seed) -> (the object saved, the backbone in hub layout))
    "dinov2_hub": ("vit_small_patch14_dinov2", "dinov2", _hub("vit_small_patch14_dinov2")),
    "dinov2_hub_registers": ("vit_small_patch14_reg4_dinov2", "dinov2", _hub("vit_small_patch14_reg4_dinov2")),
    "dinov2_training_chunked": (
        "vit_small_patch14_dinov2",
        "dinov2",
        lambda seed: dinov2_training(OFFICIAL["vit_small_patch14_dinov2"], seed, chunks=4),
    ),
    "dinov2_training_chunked_registers": (
        "vit_small_patch14_reg4_dinov2",
        "dinov2",
        lambda seed: dinov2_training(OFFICIAL["vit_small_patch14_reg4_dinov2"], seed, chunks=3),
    ),
    "dinov3_hub": ("vit_small_patch16_dinov3", "dinov3", _hub("vit_small_patch16_dinov3")),
    "dinov3_hub_swiglu": ("vit_small_plus_patch16_dinov3", "dinov3", _hub("vit_small_plus_patch16_dinov3")),
    # the 7B's quirks on a small SwiGLU network: no qkv bias at all, local_cls_norm (for local crops, unused in eval)
    "dinov3_hub_7b_quirks": (
        "vit_small_plus_patch16_dinov3",
        "dinov3",
        _hub("vit_small_plus_patch16_dinov3", qkv_bias=False, local_cls_norm=True, align_to=64),
    ),
    "dinov3_training": (
        "vit_small_patch16_dinov3",
        "dinov3",
        lambda seed: dinov3_training(OFFICIAL["vit_small_patch16_dinov3"], seed),
    ),
}


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory):
    """id -> (path, hub backbone, timm reference), each written once."""
    root, out = tmp_path_factory.mktemp("dino"), {}
    for seed, (name, (arch, _, make)) in enumerate(LAYOUTS.items()):
        saved, hub = make(seed)
        path = root / f"{name}.pth"
        torch.save(saved, path)
        out[name] = (path, hub, timm_reference(arch, hub))
    return out


@pytest.mark.parametrize("explicit", [True, False], ids=["format", "auto"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_official_layout_equals_timm(name, explicit, layout_files, caplog):
    arch, fmt, _ = LAYOUTS[name]
    path, _, ref = layout_files[name]
    caplog.set_level(logging.INFO, logger="fastreg.teachers")
    teacher = _teacher(arch, path, fmt if explicit else "auto")
    x = _images(arch)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 0]
    assert teacher.dim == DIMS[arch]
    out = teacher(x)
    assert out.shape == (2, teacher.dim) and out.dtype == torch.float32
    _close(out, expected)
    if not explicit:  # both families have a mask_token: DINOv3 files must not be taken for DINOv2's
        assert f"format {fmt}, detected" in caplog.text


@pytest.mark.parametrize("name", ["dinov2_training_chunked", "dinov2_training_chunked_registers"])
def test_a_training_checkpoints_position_embedding_loads_as_saved(name, layout_files):
    """At its own grid (16 x 16: 224 px crops), not resampled to the hub's 37 x 37 on the way in: a 224 px input
    then uses it unchanged, as DINOv2's forward does. (Registers: timm keeps the class token's row in cls_token.)"""
    arch, fmt, _ = LAYOUTS[name]
    path, hub, _ = layout_files[name]
    loaded = _teacher(arch, path, fmt).backbone.pos_embed
    assert hub["pos_embed"].shape[1] == 1 + 16 * 16
    assert torch.equal(loaded, hub["pos_embed"][:, 1:] if "register_tokens" in hub else hub["pos_embed"])


def test_the_reference_tells_the_weights_apart(layout_files):
    """The comparison can fail: another seed's weights give other features."""
    path, _, _ = layout_files["dinov3_hub"]
    _, _, other = layout_files["dinov3_training"]  # same arch, another seed
    teacher = _teacher("vit_small_patch16_dinov3", path)
    x = _images("vit_small_patch16_dinov3")
    with torch.no_grad():
        assert not torch.allclose(teacher(x), other.forward_features(x)[:, 0], atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Wrong layouts are refused, by file and by problem


@functools.cache
def _official(arch: str) -> dict:
    """The official hub state_dict of `arch` (seed 0), made once: tests change copies of it (new tensors, never in
    place)."""
    return official_state_dict(OFFICIAL[arch])


def _save(tmp_path, sd, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


def _refused(arch: str, path: str, fmt: str = "auto", **kw) -> str:
    with pytest.raises(ValueError, match=re.escape(path)) as e:
        _teacher(arch, path, fmt, **kw)
    return str(e.value)


@pytest.mark.parametrize("fmt", ["dinov3", "auto"])
def test_dinov3_renamed_layer_scale_is_refused(tmp_path, fmt):
    arch = "vit_small_patch16_dinov3"
    sd = dict(_official(arch))
    sd["blocks.3.ls1.scale"] = sd.pop("blocks.3.ls1.gamma")
    msg = _refused(arch, _save(tmp_path, sd), fmt)
    assert re.search(r"blocks\.3\.(ls1|gamma_1)", msg), msg


@pytest.mark.parametrize("fmt", ["dinov2", "auto"])
def test_dinov2_registers_file_without_register_tokens_is_refused(tmp_path, fmt):
    arch = "vit_small_patch14_reg4_dinov2"
    sd = dict(_official(arch))
    del sd["register_tokens"]
    msg = _refused(arch, _save(tmp_path, sd), fmt)
    assert re.search(r"register_tokens|reg_token", msg), msg


def test_dinov2_file_with_registers_is_refused_by_the_arch_without(tmp_path):
    sd = dict(_official("vit_small_patch14_reg4_dinov2"))
    msg = _refused("vit_small_patch14_dinov2", _save(tmp_path, sd))
    assert re.search(r"register_tokens|reg_token|pos_embed", msg), msg


@pytest.mark.parametrize(
    "arch",
    ["vit_small_patch14_dinov2", "vit_small_patch16_dinov3"],
)
def test_file_of_another_size_is_refused(tmp_path, arch):
    sd = official_state_dict(with_spec(arch, dim=192, heads=3))  # a ViT-Ti/14 or /16 in the same layout
    msg = _refused(arch, _save(tmp_path, sd))
    assert "shape" in msg, msg


def test_dinov2_file_is_refused_by_a_dinov3_arch(tmp_path):
    sd = dict(_official("vit_small_patch14_dinov2"))
    _refused("vit_small_patch16_dinov3", _save(tmp_path, sd))


def test_dinov3_file_read_as_dinov2_is_refused(tmp_path):
    sd = dict(_official("vit_small_patch16_dinov3"))
    _refused("vit_small_patch16_dinov3", _save(tmp_path, sd), "dinov2")


@pytest.mark.parametrize("part", [0, 2], ids=["q", "v"])
def test_nonzero_qkv_bias_is_refused_where_timm_has_none(tmp_path, part):
    """timm's DINOv3 models (no _qkvb) have no q/v bias: a file with one would silently lose it."""
    arch = "vit_small_patch16_dinov3"
    sd = dict(_official(arch))
    d = OFFICIAL[arch].dim
    sd["blocks.5.attn.qkv.bias"] = sd["blocks.5.attn.qkv.bias"].clone()
    sd["blocks.5.attn.qkv.bias"][part * d + 7] = 0.5
    msg = _refused(arch, _save(tmp_path, sd))
    assert "blocks.5.attn.qkv.bias" in msg, msg


def test_masked_k_bias_is_not_a_bias(tmp_path):
    """DINOv3 multiplies qkv.bias by bias_mask, zero on the K third: a non-zero value there never enters the network
    (nor timm's, which drops K's bias), so the file is DINOv3's and loads."""
    arch = "vit_small_patch16_dinov3"
    sd = dict(_official(arch))
    d = OFFICIAL[arch].dim
    sd["blocks.5.attn.qkv.bias"] = sd["blocks.5.attn.qkv.bias"].clone()
    sd["blocks.5.attn.qkv.bias"][d : 2 * d] = 0.5
    assert sd["blocks.5.attn.qkv.bias_mask"][d : 2 * d].eq(0).all()
    teacher = _teacher(arch, _save(tmp_path, sd))
    x = _images(arch)
    with torch.no_grad():
        _close(teacher(x), timm_reference(arch, _official(arch)).forward_features(x)[:, 0])


def test_rope_periods_other_than_timms_are_refused(tmp_path):
    arch = "vit_small_patch16_dinov3"
    sd = dict(_official(arch))
    sd["rope_embed.periods"] = rope_periods(with_spec(arch, rope_base=1000.0))
    msg = _refused(arch, _save(tmp_path, sd))
    assert "periods" in msg, msg


def test_bf16_rope_periods_are_accepted(tmp_path):
    """The training code's default RoPE dtype is bf16: the periods computed in bf16 are the same periods."""
    arch = "vit_small_patch16_dinov3"
    sd = official_state_dict(OFFICIAL[arch], seed=3)
    sd["rope_embed.periods"] = rope_periods(OFFICIAL[arch], torch.bfloat16)
    assert not torch.equal(sd["rope_embed.periods"].float(), rope_periods(OFFICIAL[arch]))  # bf16 rounds them
    teacher = _teacher(arch, _save(tmp_path, sd), "dinov3")
    x = _images(arch)
    with torch.no_grad():
        _close(teacher(x), timm_reference(arch, sd).forward_features(x)[:, 0])


# ----------------------------------------------------------------------------------------------------------
# teacher.feature


@pytest.mark.parametrize("name", ["dinov2_hub_registers", "dinov3_hub"])
def test_cls_avgpool_is_cls_and_the_patch_mean_without_registers(name, layout_files):
    arch, fmt, _ = LAYOUTS[name]
    path, _, ref = layout_files[name]
    teacher = _teacher(arch, path, fmt, feature="cls_avgpool")
    assert teacher.dim == 2 * DIMS[arch]
    x = _images(arch, n=3)
    n_reg = OFFICIAL[arch].n_tokens
    assert n_reg == 4
    with torch.no_grad():
        tokens = ref.forward_features(x)  # (B, 1 + n_reg + patches, D), after the final norm
    assert tokens.shape[1] == 1 + n_reg + 16
    expected = torch.cat([tokens[:, 0], tokens[:, 1 + n_reg :].mean(1)], dim=1)
    out = teacher(x)
    assert out.shape == (3, 2 * DIMS[arch])
    _close(out, expected)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)  # the test can tell them apart
    assert not torch.allclose(out, with_registers, atol=1e-3)


def test_feature_on_a_conv_teacher():
    teacher = build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", feature="cls"))
    assert teacher(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    with pytest.raises(ValueError, match="cls_avgpool"):
        build_teacher(TeacherConfig(arch="cnn_small", checkpoint="random", feature="cls_avgpool"))


# ----------------------------------------------------------------------------------------------------------
# The registry: every new arch builds, at its dim, from the official shapes


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_registry_network_on_meta(arch):
    """Each DINOv2/v3 arch builds (checkpoint=random) at its registry dim, and the official hub layout of its size,
    L/g/H+/7B included, maps onto its network through timm's filter, key for key and shape for shape. On the meta
    device: no weights are made, the forward gives shapes only."""
    assert TEACHERS[arch].dim == DIMS[arch]
    teacher = build_teacher(TeacherConfig(arch=arch, checkpoint="random", feature="cls_avgpool"), device="meta")
    assert teacher.dim == 2 * DIMS[arch]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.backbone.num_prefix_tokens == 1 + OFFICIAL[arch].n_tokens
    sd = official_state_dict(OFFICIAL[arch], device="meta")
    with contextlib.redirect_stdout(io.StringIO()):
        weights = _timm_filter(arch)(dict(sd), teacher.backbone)
    teacher.backbone.load_state_dict(weights, strict=True, assign=True)
    # the backbone's tokens (Teacher.forward's autocast has no meta device)
    x = torch.empty(2, 3, 224, 224, device="meta")
    assert vit_feature(teacher.backbone, x, "cls").shape == (2, DIMS[arch])
    assert vit_feature(teacher.backbone, x, "cls_avgpool").shape == (2, 2 * DIMS[arch])


@pytest.mark.parametrize("arch", SMALL)
def test_random_build_on_cpu(arch):
    teacher = build_teacher(TeacherConfig(arch=arch, checkpoint="random"))
    out = teacher(_images(arch))
    assert out.shape == (2, DIMS[arch]) and torch.isfinite(out).all()
