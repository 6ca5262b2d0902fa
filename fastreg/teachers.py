"""Frozen teachers: the registry of architectures, and the checkpoint layouts they load from.

A teacher maps images (B, 3, H, W) to a float32 feature (B, dim): the pooled backbone feature (SimReg), or
with `teacher.projection=true` the output of the checkpoint's own projection head (SEED on MoCo/SwAV).

Every SSL repository saves its weights in its own layout (prefixes, heads, a second encoder). The layout is
detected from the key names, or set with `teacher.format=`. Backbone keys are then matched exactly. A
missing, unexpected or mis-shaped backbone key is an error. Everything else the checkpoint holds (heads,
prototypes, predictors, momentum encoders) is logged as ignored. DINO's own loader uses strict=False and
only prints, so a wrong layout would silently distill a random teacher.

Keys do not always tell the network: BYOL's TF-converted ResNet-50 has torchvision's keys but pads "SAME"
(teacher.arch=byol_resnet50), and MoCo-v3's ViT-S has DINO's ViT-S keys but 12 heads, not 6
(teacher.arch=vit_small_mocov3). Those mismatches are refused where the layout or the weights show them.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models import eva, vision_transformer
from torch import nn
from torchvision import models as tvm

from fastreg import checkpoint
from fastreg.config import TEACHER_FORMATS, TeacherConfig
from fastreg.heads import L2Norm
from fastreg.messages import listing
from fastreg.students import SmallCNN, drop_module
from fastreg.teacher_inference import fold_batch_norms

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Architectures


class ResNet50Wide(tvm.ResNet):
    """SimCLR-v1's ResNet-50 (x2, x4): every channel count, stem included, is `width` times torchvision's.

    torchvision's wide_resnet50_2 widens only the bottleneck's inner 3x3 and still outputs 2048; SimCLR (and
    SwAV's w2/w4) widen everything, so the pooled feature is 2048 * width. The module names are torchvision's,
    so checkpoints from the SimCLR converter (tonylins/simclr-converter, `{"state_dict": ...}`) load as is.
    """

    def __init__(self, width: int):
        self.width = width  # read by _make_layer, which ResNet.__init__ calls
        super().__init__(tvm.resnet.Bottleneck, [3, 4, 6, 3])
        # ResNet.__init__ hard-codes a 64-channel stem: widen it as well
        self.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet.__init__
        self.bn1 = nn.BatchNorm2d(64 * width)
        self.fc = nn.Identity()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # layer1: its input is the widened stem, not ResNet's 64 channels
            self.inplanes = 64 * self.width
        return super()._make_layer(block, planes * self.width, blocks, stride, dilate)


def _same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one spatial side of size n for kernel k, stride s: (before, after).

    The output has ceil(n / s) positions; the input is padded by total = max((ceil(n/s) - 1) * s + k - n, 0),
    total // 2 before and the rest after (ajtejankar/byol-convert resnet.py, calc_padding_same). At even sizes a
    stride-2 layer pads one more after than before, where PyTorch's symmetric padding differs.
    """
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A Conv2d (no dilation) padded as TensorFlow's "SAME", from the input's size at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = map(_same_padding, x.shape[-2:], self.kernel_size, self.stride)
        if top == bottom and left == right:  # symmetric: the conv pads itself, no padded copy of x
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))  # zeros, as TF's conv
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """A MaxPool2d padded as TensorFlow's "SAME" with -inf, from the input's size at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = map(_same_padding, x.shape[-2:], (self.kernel_size,) * 2, (self.stride,) * 2)
        if top == bottom and left == right:  # max_pool2d's own padding is -inf
            return F.max_pool2d(x, self.kernel_size, self.stride, (top, left))
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), self.kernel_size, self.stride)


def _byol_resnet50() -> nn.Module:
    """BYOL's ResNet-50 as SimReg runs it (simreg.py builds it from models/resnet_byol.py): torchvision's ResNet-50,
    module names and all, with TF "SAME" padding in every conv and the stem max-pool, as the network of the converter
    that made the weights does (ajtejankar/byol-convert resnet.py: pad_same before each conv and the max-pool).

    BYOL was trained in JAX/Haiku, whose convs pad "SAME"; its weights, converted, run right only so. At 224 px the
    stem conv pads (2, 3) where torchvision pads (3, 3), and the max-pool and every stride-2 3x3 conv (0, 1), not
    (1, 1). (byol-convert pads the max-pool with 0, not -inf: the same after the stem's ReLU.)
    """
    model = drop_module(tvm.resnet50(), "fc")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d):
            same = Conv2dSame(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, groups=m.groups, bias=m.bias is not None
            )
            model.set_submodule(name, same)
        elif isinstance(m, nn.MaxPool2d):
            model.set_submodule(name, MaxPool2dSame(m.kernel_size, m.stride))
    return model


def _vit(name: str, **kwargs) -> nn.Module:
    # num_classes=0: the output is the CLS token after the final norm. dynamic_img_size resamples the position
    # embedding to the input's patch grid, so DINOv2 (trained at 518 px: 37x37 patches, the pos-embed's shape
    # in its checkpoints) takes 224 px crops, and every ViT takes any data.crop_size.
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


def mocov3_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """MoCo-v3's fixed position embedding (moco-v3 vits.py, build_2d_sincos_position_embedding): (1, 1 + grid^2, dim).

    Token a*grid + b (row a, column b of the patch grid) gets [sin(a w), cos(a w), sin(b w), cos(b w)] with
    w_d = 10000^(-d / (dim/4)), d < dim/4; the class token's row is zeros.
    """
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    a = torch.outer(pos.repeat_interleave(grid), omega)  # (grid^2, dim/4): row coordinate
    b = torch.outer(pos.repeat(grid), omega)  # column coordinate
    table = torch.cat([torch.sin(a), torch.cos(a), torch.sin(b), torch.cos(b)], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def _vit_small_mocov3() -> nn.Module:
    """MoCo-v3's ViT-S/16 (moco-v3 vits.py vit_small): 384-d, depth 12, 12 heads of 32 (timm's ViT-S, DINO's, has 6
    of 64), MLP ratio 4, qkv bias, LayerNorm eps 1e-6 (timm's default); the feature is the CLS token after the final
    norm (timm's VisionTransformer, which MoCo-v3 subclasses). Its fixed 2-D sin-cos position embedding is stored in
    its checkpoints as pos_embed; built here too, so an untrained one is MoCo-v3's network as well.
    """
    model = _vit("vit_small_patch16_224", num_heads=12)
    grid = model.patch_embed.grid_size[0]
    model.pos_embed = nn.Parameter(mocov3_pos_embed(grid, model.embed_dim), requires_grad=False)
    return model


class TeacherArch(NamedTuple):
    build: Callable[[], nn.Module]  # a classifier-free backbone: (B, 3, H, W) -> (B, dim)
    dim: int  # width of the pooled feature
    conv: bool  # a conv net: stored and run channels_last


TEACHERS: dict[str, TeacherArch] = {
    "resnet50": TeacherArch(lambda: drop_module(tvm.resnet50(), "fc"), 2048, True),
    "byol_resnet50": TeacherArch(_byol_resnet50, 2048, True),  # BYOL's TF-converted weights (SimReg)
    "resnet101": TeacherArch(lambda: drop_module(tvm.resnet101(), "fc"), 2048, True),
    "resnet152": TeacherArch(lambda: drop_module(tvm.resnet152(), "fc"), 2048, True),
    "wide_resnet50_2": TeacherArch(lambda: drop_module(tvm.wide_resnet50_2(), "fc"), 2048, True),
    "resnet50x2": TeacherArch(lambda: ResNet50Wide(2), 4096, True),
    "resnet50x4": TeacherArch(lambda: ResNet50Wide(4), 8192, True),
    "vit_small_patch16": TeacherArch(lambda: _vit("vit_small_patch16_224"), 384, False),  # DINO ViT-S/16
    "vit_small_mocov3": TeacherArch(_vit_small_mocov3, 384, False),  # MoCo-v3 ViT-S/16
    # DINO ViT-B/16; MoCo-v3's ViT-B is this network too (12 heads), its sin-cos pos_embed comes with its weights
    "vit_base_patch16": TeacherArch(lambda: _vit("vit_base_patch16_224"), 768, False),
    # DINOv2 (facebookresearch/dinov2 hub, 518 px position embedding resampled to the input), with 4 registers or
    # none; ViT-g's MLP is SwiGLU. The name is timm's model's.
    **{
        f"vit_{size}_patch14{reg}_dinov2": TeacherArch(partial(_vit, f"vit_{size}_patch14{reg}_dinov2"), dim, False)
        for size, dim in (("small", 384), ("base", 768), ("large", 1024), ("giant", 1536))
        for reg in ("", "_reg4")
    },
    # DINOv3 (facebookresearch/dinov3 hub): RoPE, 4 storage tokens, patch 16; S+, H+ and 7B have SwiGLU MLPs. S to
    # H+ are distilled from the 7B. timm builds them without q/v biases: the released ones are zero (_dinov3_keys)
    **{
        f"vit_{size}_patch16_dinov3": TeacherArch(partial(_vit, f"vit_{size}_patch16_dinov3"), dim, False)
        for size, dim in (
            ("small", 384),
            ("small_plus", 384),
            ("base", 768),
            ("large", 1024),
            ("huge_plus", 1280),
            ("7b", 4096),
        )
    },
    "cnn_small": TeacherArch(lambda: SmallCNN((32, 64, 128)), 128, True),  # the embedded demo's teacher
}


# ----------------------------------------------------------------------------------------------------------
# Checkpoint layouts


@dataclass(frozen=True)
class Layout:
    """Where one format keeps the backbone's keys (every key has had a DDP `module.` stripped)."""

    prefixes: tuple[str, ...]  # the backbone's key prefix: the first one some key starts with ("" = plain keys)
    projection: tuple[str, ...] = ()  # sub-prefixes under the backbone prefix that hold the projection head
    ignored: tuple[str, ...] = ()  # sub-prefixes under it that are heads or classifiers, not backbone
    l2_normalized: bool = False  # the network itself L2-normalizes its projection's output
    # (backbone keys without the prefix, meta model, where) -> the same in timm's names, for layouts whose key names
    # are not timm's
    convert: Callable[[StateDict, nn.Module, str], StateDict] | None = None


_CLASSIFIERS = ("fc.", "head.")  # torchvision's and timm's classifier
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # blocks.<chunk>.<i>. -> blocks.<i>.


def _dinov2_keys(weights: StateDict, model: nn.Module, where: str) -> StateDict:
    """DINOv2's names -> timm's, by timm's vision_transformer.checkpoint_filter_fn (register_tokens -> reg_token with
    the class token's position folded in, SwiGLU w12/w3 -> fc1/fc2). Training checkpoints built with block_chunks
    (FSDP) name block i blocks.<chunk>.<i>.*: flattened to blocks.<i>.* first."""
    flat = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in weights.items()}
    registers = getattr(model, "reg_token", None) is not None
    if ("register_tokens" in flat) != registers:  # timm's filter would fail on the position embedding's shape
        has, lacks, arch = ("teacher.arch", "the checkpoint", "vit_<size>_patch14_dinov2, without")
        if not registers:
            has, lacks, arch = ("the checkpoint", "teacher.arch", "vit_<size>_patch14_reg4_dinov2, with")
        raise ValueError(
            f"{where}: {has} has register tokens (register_tokens), {lacks} none: set teacher.arch to the DINOv2 "
            f"ViT {arch} registers"
        )
    grid = math.isqrt(flat["pos_embed"].shape[1] - 1) if "pos_embed" in flat else None  # official: 1 + g^2 rows
    if grid and (grid, grid) != tuple(model.patch_embed.grid_size):
        # The hub's grid is 37 x 37 (518 px), a training checkpoint's its global crop's (224 px: 16 x 16). Take the
        # checkpoint's, so that the position embedding is resampled once, to the input's grid, as DINOv2's own
        # forward does; timm's filter would resample it to 37 x 37 first, and the forward back: not the same.
        model.set_input_size(img_size=grid * model.patch_embed.patch_size[0])
    return vision_transformer.checkpoint_filter_fn(flat, model)


def _dinov3_keys(weights: StateDict, model: nn.Module, where: str) -> StateDict:
    """DINOv3's names -> timm's, by timm's eva.checkpoint_filter_fn (storage_tokens -> reg_token, ls{1,2}.gamma ->
    gamma_{1,2}, SwiGLU w1/w2/w3 -> fc1_g/fc1_x/fc2). Two things timm drops unchecked are checked first: the RoPE
    periods, and the attention biases of a model without them."""
    _check_rope_periods(weights, model, where)
    return eva.checkpoint_filter_fn(_without_zero_qkv_biases(weights, model, where), model)


def _check_rope_periods(weights: StateDict, model: nn.Module, where: str) -> None:
    """The checkpoint's RoPE periods (rope_embed.periods, saved in bf16) must be those timm's model computes: other
    periods (another base or min/max period) would rotate every query and key differently."""
    rope = next((m for m in model.modules() if isinstance(m, RotaryEmbeddingDinoV3)), None)
    saved = weights.get("rope_embed.periods")
    if rope is None or saved is None:
        return
    ours = rope._compute_periods()  # (head_dim / 4,) float32
    if saved.shape != ours.shape or not torch.allclose(saved.float(), ours, rtol=1e-2):  # bf16 keeps 8 bits
        raise ValueError(
            f"{where}: its RoPE periods (rope_embed.periods {listing(f'{p:.4g}' for p in saved.float().tolist())}) "
            f"are not those of the teacher.arch's network ({listing(f'{p:.4g}' for p in ours.tolist())}): these "
            "weights were trained with another position encoding; check teacher.arch"
        )


def _without_zero_qkv_biases(weights: StateDict, model: nn.Module, where: str) -> StateDict:
    """DINOv3 saves qkv.bias with a bias_mask (the forward adds bias * bias_mask); timm builds the released models
    without biases, as theirs are zero, the masks too (facebookresearch/dinov3#195). On such a model, every masked
    qkv.bias must be zero: then it is dropped."""
    if any(name.endswith("q_bias") for name, _ in model.named_parameters()):
        return weights
    biases = [k for k in weights if k.endswith("attn.qkv.bias")]
    masked = {k: weights[k] * weights.get(k + "_mask", torch.ones(1)).nan_to_num(1.0) for k in biases}
    if nonzero := [k for k, bias in masked.items() if bias.any()]:
        raise ValueError(
            f"{where}: {len(nonzero)} attention biases are non-zero ({listing(nonzero)}); the network of teacher.arch "
            "has none, as the released DINOv3 weights' are zero. These are other weights: check teacher.checkpoint"
        )
    dropped = {*biases, *(k + "_mask" for k in biases)}
    return {k: v for k, v in weights.items() if k not in dropped}


LAYOUTS: dict[str, Layout] = {
    "torchvision": Layout(("",), ignored=_CLASSIFIERS),
    # MoCo v1/v2: encoder_q's fc is its projection (v1: one Linear; v2: fc.0-ReLU-fc.2, 2048-2048-128).
    # encoder_k (the momentum copy) and the queue lie outside and are ignored.
    "moco": Layout(("encoder_q.",), projection=("fc.",)),
    # MoCo v3: projector in fc (ResNet) or head (ViT); predictor and momentum_encoder lie outside.
    "mocov3": Layout(("base_encoder.",), projection=("fc.", "head.")),
    # SwAV (and SEED's SwAV teacher) build the network with normalize=True: forward_head L2-normalizes the
    # projection_head output (facebookresearch/swav src/resnet50.py; SEED seed/builder.py, normalize=True).
    # MultiPrototypes' keys are prototypes.prototypes<i>.weight.
    "swav": Layout(("",), projection=("projection_head.",), ignored=("prototypes",), l2_normalized=True),
    # BYOL converted from JAX/Haiku (ajtejankar/byol-convert convert.py): plain torchvision keys, fc = BYOL's online
    # linear classifier; its network pads "SAME", so only teacher.arch=byol_resnet50 runs it (_check_network)
    "byol": Layout(("",), ignored=("fc.",)),
    # SimSiam: encoder.* with its projector in encoder.fc; predictor.* lies outside and is ignored
    "simsiam": Layout(("encoder.",), projection=("fc.",)),
    # DINO full checkpoints: the teacher entry, backbone.* next to head.* (the DINO head); released weights: plain
    "dino": Layout(("backbone.", ""), ignored=_CLASSIFIERS),
    # DINOv2 and DINOv3: their hub .pth (plain keys) or a training checkpoint's teacher (backbone.* next to
    # dino_head.* and ibot_head.*). mask_token is used only by the iBOT loss; DINOv3's rope_embed.periods is a
    # buffer timm computes (checked against it), local_cls_norm the 7B's norm for local crops, projectors.*
    # EUPE's distillation heads.
    "dinov2": Layout(("backbone.", ""), ignored=("mask_token",) + _CLASSIFIERS, convert=_dinov2_keys),
    "dinov3": Layout(
        ("backbone.", ""),
        ignored=("mask_token", "rope_embed.", "local_cls_norm.", "projectors.") + _CLASSIFIERS,
        convert=_dinov3_keys,
    ),
}
_MOMENTUM_PREFIX = {"moco": "encoder_k.", "mocov3": "momentum_encoder."}  # teacher.momentum_encoder=true

# Auto-detection, first hit wins: prefixed layouts are unambiguous; DINOv2 differs from a plain ViT by its
# mask_token, DINOv3 (which has one too) from DINOv2 by its storage (register) tokens
_MARKERS = (
    ("moco", ("encoder_q.", "encoder_k.")),
    ("mocov3", ("base_encoder.", "momentum_encoder.")),
    ("swav", ("prototypes", "projection_head.")),
    ("dinov3", ("storage_tokens", "backbone.storage_tokens")),
    ("dinov2", ("mask_token", "backbone.mask_token")),
    ("dino", ("backbone.",)),
)
# SEED's main.py saves the whole SEED module: student.*, teacher.* (the frozen copy it distilled) and the queue
_DISTILLED = ("student.", "teacher.")
_FORMAT_HINT = f"set the layout with teacher.format=<{'|'.join(f for f in TEACHER_FORMATS if f != 'auto')}>"


def _unwrap(ckpt):
    """The state_dict inside the common containers. DINO's full checkpoints hold `teacher` next to `student`:
    the teacher (the EMA) is the one to distill."""
    while isinstance(ckpt, dict):
        inner = next((ckpt[k] for k in ("teacher", "state_dict", "model") if isinstance(ckpt.get(k), dict)), None)
        if inner is None:
            return ckpt
        ckpt = inner
    return ckpt


TEACHER_FIX = "set teacher.checkpoint (teachers.<i>.checkpoint with several teachers) to the teacher's weights file"


def read_state_dict(path: str | Path) -> StateDict:
    """The tensors of a checkpoint file (fastreg.checkpoint.read), out of their container and without DDP's
    `module.` prefix."""
    ckpt = _unwrap(checkpoint.read(path, "teacher checkpoint", TEACHER_FIX))
    tensors = {}
    if isinstance(ckpt, dict):
        tensors = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        found = listing(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"teacher checkpoint {path} holds no state_dict (found: {found}): point teacher.checkpoint "
            "at a file of the teacher's weights"
        )
    return tensors


def detect_format(keys: list[str], model_keys: dict[str, torch.Tensor], path: str | Path = "") -> str:
    """The layout of a checkpoint's keys (after `module.` is stripped): prefixed layouts by their prefixes, then
    plain keys of the backbone itself (torchvision), then SimSiam's encoder + predictor.

    BYOL's converted weights have plain torchvision keys, like torchvision's and Barlow Twins' own: they are
    detected as torchvision, and only teacher.arch=byol_resnet50 or teacher.format=byol says what they are."""
    if all(any(k.startswith(p) for k in keys) for p in _DISTILLED):
        raise ValueError(
            f"teacher checkpoint {path} is a distillation run's (student.* next to teacher.* keys, as SEED saves "
            "them), not a teacher's own weights: point teacher.checkpoint at the teacher's file (SEED's MoCo-v2 R50: "
            "jianfw_mocov2_ResNet50_epoch200.pth)"
        )
    for fmt, prefixes in _MARKERS:
        if any(k.startswith(prefixes) for k in keys):
            return fmt
    if any(k in model_keys for k in keys):
        return "torchvision"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("predictor.") for k in keys):
        return "simsiam"
    raise ValueError(
        f"teacher checkpoint {path}: no known layout matches its keys ({listing(sorted(keys))}); "
        f"wrong teacher.arch, or {_FORMAT_HINT}"
    )


@dataclass
class _Split:
    """A checkpoint's keys sorted by what they are to the teacher; names are relative to their module."""

    backbone: StateDict = field(default_factory=dict)
    projection: StateDict = field(default_factory=dict)
    ignored: Counter = field(default_factory=Counter)  # module name -> number of its keys ignored
    unexpected: list[str] = field(default_factory=list)  # under the backbone prefix, yet not the backbone's


def _prefix(weights: StateDict, layout: Layout) -> str:
    return next((p for p in layout.prefixes if any(k.startswith(p) for k in weights)), layout.prefixes[0])


def _timm_keys(weights: StateDict, layout: Layout, model: nn.Module, where: str) -> StateDict:
    """The checkpoint with its backbone's keys (under the layout's prefix) converted to timm's names; the keys the
    layout ignores are kept as they are, for _split to log."""
    prefix = _prefix(weights, layout)
    inner = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    kept = {k: v for k, v in weights.items() if not k.startswith(prefix) or k[len(prefix) :].startswith(layout.ignored)}
    converted = layout.convert(dict(inner), model, where)
    return {**kept, **{prefix + k: v for k, v in converted.items()}}


def _split(weights: StateDict, layout: Layout, model_keys: dict[str, torch.Tensor], keep_projection: bool) -> _Split:
    prefix = _prefix(weights, layout)
    proj = next((p for p in layout.projection if any(k.startswith(prefix + p) for k in weights)), None)
    out = _Split()
    for key, value in weights.items():
        sub = key[len(prefix) :]
        if not key.startswith(prefix):
            out.ignored[key.split(".")[0]] += 1
        elif proj and sub.startswith(proj):
            if keep_projection:
                out.projection[sub[len(proj) :]] = value
            else:
                out.ignored[prefix + proj.rstrip(".")] += 1
        elif sub in model_keys:
            out.backbone[sub] = value
        elif sub.startswith(layout.ignored):
            out.ignored[prefix + sub.split(".")[0]] += 1
        else:
            out.unexpected.append(key)
    return out


def _check_backbone(split: _Split, model_keys: dict[str, torch.Tensor], arch: str, where: str) -> None:
    """Every backbone tensor must come from the checkpoint, with the model's shape."""
    # Checkpoints older than torch 0.4.1 lack BatchNorm's num_batches_tracked: BN fills it in, eval never reads it
    missing = [k for k in model_keys if k not in split.backbone and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(model_keys[k].shape)}"
        for k, v in split.backbone.items()
        if v.shape != model_keys[k].shape
    ]
    problems = (
        ("backbone keys are missing from the checkpoint", missing),
        ("checkpoint keys are not in the backbone", split.unexpected),
        ("tensors have the wrong shape (checkpoint vs model)", shapes),
    )
    for problem, keys in problems:
        if keys:
            raise ValueError(
                f"{where} does not fit teacher.arch={arch}: {len(keys)} {problem}: {listing(keys)}. "
                f"Check teacher.arch, or {_FORMAT_HINT}"
            )


def _projection_layer(params: StateDict) -> nn.Module:
    if not params:  # MoCo/SwAV projectors keep their ReLUs between the layers that hold weights
        return nn.ReLU()
    if "running_mean" in params:  # MoCo v3's last BN has affine=False: no weight, no bias
        return nn.BatchNorm1d(len(params["running_mean"]), affine="weight" in params)
    out_dim, in_dim = params["weight"].shape
    return nn.Linear(in_dim, out_dim, bias="bias" in params)


def _build_projection(weights: StateDict, in_dim: int, where: str) -> nn.Sequential:
    """The projection MLP, from its keys: `{i}.weight` etc. of a Linear or BatchNorm1d at index i of an
    nn.Sequential, and a ReLU at every index without keys (MoCo v2 fc.1, MoCo v3, SwAV projection_head.2)."""
    if not any(k.split(".")[0].isdigit() for k in weights):  # MoCo v1: fc is a single Linear
        weights = {f"0.{k}": v for k, v in weights.items()}
    try:
        by_index = {int(k.split(".")[0]): {} for k in weights}
        for k, v in weights.items():
            i, name = k.split(".", 1)
            by_index[int(i)][name] = v
        with torch.device("meta"):  # shapes only: the checkpoint supplies every tensor
            head = nn.Sequential(*(_projection_layer(by_index.get(i, {})) for i in range(max(by_index) + 1)))
        head.load_state_dict(weights, assign=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{where}: cannot read its projection head as Linear/BatchNorm1d layers: {e}") from e
    first = next(m for m in head if isinstance(m, nn.Linear))
    if first.in_features != in_dim:
        raise ValueError(f"{where}: the projection head takes {first.in_features}-d input, the backbone gives {in_dim}")
    return head


def _projection_dim(head: nn.Sequential) -> int:
    last = [m for m in head if isinstance(m, (nn.Linear, nn.BatchNorm1d))][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.num_features


def _layout(fmt: str, momentum_encoder: bool) -> Layout:
    if not momentum_encoder:
        return LAYOUTS[fmt]
    if fmt not in _MOMENTUM_PREFIX:
        raise ValueError(f"teacher.momentum_encoder=true needs a MoCo checkpoint (format moco or mocov3), not {fmt}")
    return replace(LAYOUTS[fmt], prefixes=(_MOMENTUM_PREFIX[fmt],))


_BYOL_NEEDS = (
    "BYOL's weights are converted from TensorFlow/JAX and ran with TF 'SAME' padding (asymmetric at even sizes), "
    "so they need teacher.arch=byol_resnet50; PyTorch-trained ResNet-50s run as teacher.arch=resnet50 with their "
    "own format (SimSiam: teacher.format=simsiam; Barlow Twins: torchvision)"
)


def _is_mocov3_pos_embed(pos_embed: torch.Tensor) -> bool:
    """Whether a ViT's pos_embed (1, 1 + g^2, D) is MoCo-v3's fixed sin-cos table; a learned one never is."""
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if grid * grid != pos_embed.shape[1] - 1:
        return False
    return torch.allclose(pos_embed.float(), mocov3_pos_embed(grid, pos_embed.shape[2]), atol=1e-3)  # fp16 copies too


def _check_network(arch: str, fmt: str, backbone: StateDict, where: str) -> None:
    """Refuse weights whose keys fit teacher.arch but that were trained in another network: the shapes match, the
    forward does not. BYOL's ResNet-50 pads "SAME"; MoCo-v3's ViT-S splits attention into 12 heads, DINO's into 6
    (MoCo-v3's ViT-B and DINO's both have 12: vit_base_patch16 runs either). MoCo-v3's ViT weights are told by their
    layout or, in any layout (convert_to_deit.py's plain keys), by their fixed sin-cos pos_embed."""
    if fmt == "byol" and arch != "byol_resnet50":
        raise ValueError(f"{where} does not fit teacher.arch={arch}: {_BYOL_NEEDS}")
    if arch == "vit_small_patch16" and (fmt == "mocov3" or _is_mocov3_pos_embed(backbone["pos_embed"])):
        raise ValueError(
            f"{where} holds MoCo-v3 ViT-S weights (its {'layout' if fmt == 'mocov3' else 'fixed sin-cos pos_embed'} "
            "says so), trained with 12 attention heads; teacher.arch=vit_small_patch16 is timm's (DINO's) ViT-S with "
            "6, and the keys have the same shapes. Set teacher.arch=vit_small_mocov3"
        )
    dino = fmt in ("dino", "dinov2")
    if arch == "vit_small_mocov3" and (dino or not _is_mocov3_pos_embed(backbone["pos_embed"])):
        raise ValueError(
            f"{where} does not hold MoCo-v3 ViT-S weights (its {'layout' if dino else 'pos_embed'} is not MoCo-v3's "
            "fixed 2-D sin-cos); teacher.arch=vit_small_mocov3 is MoCo-v3's 12-head ViT-S. For DINO's (or another "
            "timm) ViT-S/16, 6 heads, set teacher.arch=vit_small_patch16"
        )


def _load_backbone(cfg: TeacherConfig) -> tuple[nn.Module, nn.Sequential | None]:
    """(backbone, projection head or None) for `cfg`, with every tensor from `cfg.checkpoint`."""
    arch, path, name = TEACHERS[cfg.arch], cfg.checkpoint, cfg.name or cfg.arch
    weights = read_state_dict(path)
    with torch.device("meta"):  # shapes only: the checkpoint supplies every tensor, so skip the random init
        backbone = arch.build()
    model_keys = backbone.state_dict()  # name -> meta tensor (its shape)
    fmt = detect_format(list(weights), model_keys, path) if cfg.format == "auto" else cfg.format
    where = f"teacher checkpoint {path} (format {fmt}{', detected' if cfg.format == 'auto' else ''})"
    layout = _layout(fmt, cfg.momentum_encoder)
    if layout.convert is not None:
        weights = _timm_keys(weights, layout, backbone, where)
        model_keys = backbone.state_dict()  # the conversion may size the network to the checkpoint (its pos_embed)
    split = _split(weights, layout, model_keys, cfg.projection)
    _check_backbone(split, model_keys, cfg.arch, where)
    _check_network(cfg.arch, fmt, split.backbone, where)
    if cfg.projection and not split.projection:
        raise ValueError(f"teacher.projection=true, but {where} has no projection head (other layouts: {_FORMAT_HINT})")
    backbone.load_state_dict(split.backbone, assign=True)  # strict: the keys were checked above
    for rope in (m for m in backbone.modules() if isinstance(m, RotaryEmbeddingDinoV3)):
        rope.to_empty(device="cpu", recurse=False)  # its periods: a non-persistent buffer, computed, not loaded
        rope._init_buffers()
    leftover = [n for n, t in chain(backbone.named_parameters(), backbone.named_buffers()) if t.is_meta]
    if leftover:  # a non-persistent buffer is never in a state_dict
        raise ValueError(f"teacher.arch={cfg.arch}: tensors outside its state_dict cannot load: {listing(leftover)}")
    projection = _build_projection(split.projection, arch.dim, where) if cfg.projection else None
    if projection is not None and layout.l2_normalized:
        projection.append(L2Norm())
    log.info("teacher %s: loaded %d backbone tensors from %s", name, len(split.backbone), where)
    if cfg.format == "auto" and fmt == "torchvision" and cfg.arch == "resnet50":  # the keys cannot tell: say so
        log.info("teacher %s: plain ResNet-50 keys; if these are BYOL's converted weights, %s", name, _BYOL_NEEDS)
    if split.ignored:
        under = ", ".join(f"{module} ({n})" for module, n in split.ignored.items())
        log.info("teacher %s: ignored %d checkpoint keys, under: %s", name, sum(split.ignored.values()), under)
    return backbone, projection


# ----------------------------------------------------------------------------------------------------------
# The teacher


def vit_feature(vit: nn.Module, images: torch.Tensor, feature: str) -> torch.Tensor:
    """A timm ViT's feature from its tokens after the final norm: cls (B, D), or cls_avgpool (B, 2D), the class
    token next to the mean of the patch tokens (DINOv2's linear evaluation). Registers are prefix tokens: never in."""
    tokens = vit.forward_features(images)  # (B, 1 + registers + patches, D)
    cls = tokens[:, 0]
    if feature == "cls":
        return cls
    patches = tokens[:, vit.num_prefix_tokens :]  # (B, patches, D)
    return torch.cat([cls, patches.mean(dim=1)], dim=1)


class Teacher(nn.Module):
    """A frozen backbone (and optional projection head): always in eval mode, no trainable parameters.

    `train()` is a no-op, so a trainer calling `.train()` on the whole model cannot put the teacher's BN
    into training mode (batch statistics, running-stat updates).
    """

    def __init__(
        self,
        name: str,
        arch: str,
        backbone: nn.Module,
        dim: int,
        projection: nn.Module | None = None,
        amp_dtype: torch.dtype | None = None,
        feature: str | None = None,
        input_size: int | None = None,
    ):
        super().__init__()
        self.name, self.arch, self.dim = name, arch, dim
        self.backbone, self.projection = backbone, projection
        self.amp_dtype = amp_dtype  # autocast dtype, e.g. torch.bfloat16; None runs fp32
        self.backbone_dtype: torch.dtype | None = None  # set by store_in(): the backbone runs in it, no autocast
        self.feature = feature  # a ViT's tokens to pool (vit_feature); None: the backbone's output is the feature
        self.input_size = input_size  # images are resized to input_size^2 first; None: as they come
        self.float().requires_grad_(False).eval()  # float: a checkpoint may hold fp16 tensors

    def store_in(self, dtype: torch.dtype) -> None:
        """Keep the backbone's weights in `dtype` and run it in it, with no autocast (no per-step weight casts)."""
        self.backbone_dtype = dtype
        self.backbone.to(dtype)

    def fold(self, dtype: torch.dtype | None = None) -> int:
        """The backbone as inference code (fastreg.teacher_inference): BatchNorms folded into the convolutions (in
        the weights' fp32), then weights stored in `dtype`, else the autocast dtype. Returns how many were folded."""
        folded = fold_batch_norms(self.backbone)
        self.store_in(dtype or self.amp_dtype or torch.float32)
        return folded

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, dim) float32, a plain tensor (no grad) usable in a loss with the student."""
        amp = dict(device_type=images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with torch.inference_mode(), torch.autocast(**amp):
            if self.input_size is not None and images.shape[-2:] != (self.input_size, self.input_size):
                images = F.interpolate(  # (B, 3, H, W) -> (B, 3, S, S): one resize of the decoded crop
                    images.float(), size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
                )
            if self.backbone_dtype is not None:  # stored in its compute dtype already
                with torch.autocast(images.device.type, enabled=False):
                    feat = self._backbone(images.to(self.backbone_dtype)).float()  # (B, D) pooled
            else:
                feat = self._backbone(images)  # (B, D) pooled
            if self.projection is not None:
                feat = self.projection(feat)  # (B, D) -> (B, dim)
        # Inference tensors cannot be saved for backward: copy out of inference mode, into a normal fp32 tensor
        return feat.to(torch.float32, copy=True)

    def _backbone(self, images: torch.Tensor) -> torch.Tensor:
        if self.feature is None:
            return self.backbone(images)
        return vit_feature(self.backbone, images, self.feature)


# DINOv2's own forward resamples its 37 x 37 position embedding to the input's grid g by bicubic interpolation at a
# scale factor of (g + 0.1) / 37, not antialiased (interpolate_offset=0.1, interpolate_antialias=False: its models
# without registers); timm's resamples to the size g, antialiased, which its models with registers were made with
# (offset 0, antialias on). At a fixed teacher.input_size the first are resampled once, DINOv2's way, at build time.
DINOV2_OFFSET_INTERPOLATION = {f"vit_{size}_patch14_dinov2" for size in ("small", "base", "large", "giant")}


def resample_as_dinov2(vit: nn.Module, side: int) -> None:
    """Size a timm DINOv2 ViT (class token in pos_embed, no registers) to side x side inputs, its position embedding
    resampled as DINOv2's interpolate_pos_encoding does: then its forward resamples nothing."""
    grid, (old, _) = side // vit.patch_embed.patch_size[0], vit.patch_embed.grid_size
    if grid == old:
        return
    cls_pos, patch_pos = vit.pos_embed[:, :1], vit.pos_embed[:, 1:]  # (1, 1, D), (1, old^2, D)
    image = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    scale = (grid + 0.1) / old  # the offset makes the output grid x grid after flooring
    image = F.interpolate(image.float(), scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert image.shape[-2:] == (grid, grid), image.shape
    patch_pos = image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(vit.pos_embed.dtype)
    vit.patch_embed.set_input_size(img_size=side)  # its grid: dynamic_img_size then finds nothing to resample
    vit.pos_embed = nn.Parameter(torch.cat([cls_pos, patch_pos], dim=1), requires_grad=False)


BIG_TEACHER_PARAMS = 10**9  # teacher.dtype=auto stores a transformer this big in bf16 in a bf16 run


def stored_dtype(cfg: TeacherConfig, params: int, amp_dtype: torch.dtype | None, conv: bool) -> torch.dtype | None:
    """bf16 where teacher.dtype asks for it, or (auto) for a transformer of 1B+ parameters under bf16 autocast:
    ViT-g's fp32 weights take 4.5 GB, the 7B's 27 GB; in bf16, half. None: the run's autocast decides."""
    if cfg.dtype == "bf16":
        return torch.bfloat16
    big = params >= BIG_TEACHER_PARAMS
    if cfg.dtype == "auto" and not conv and big and amp_dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def build_teacher(
    cfg: TeacherConfig, amp_dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Teacher:
    """The frozen teacher that `cfg` describes, on `device`; `amp_dtype` is its autocast dtype (None: fp32)."""
    if cfg.arch not in TEACHERS:
        raise ValueError(f"teacher.arch={cfg.arch!r} is not one of {', '.join(TEACHERS)}")
    if cfg.checkpoint is None:
        raise ValueError(f"teacher.checkpoint is not set for teacher {cfg.name or cfg.arch!r} (a path, or random)")
    arch, name = TEACHERS[cfg.arch], cfg.name or cfg.arch
    if cfg.feature == "cls_avgpool" and (arch.conv or cfg.projection):
        raise ValueError(
            f"teacher {name!r}: teacher.feature=cls_avgpool pools a vision transformer's tokens; "
            + ("a conv net has none" if arch.conv else "teacher.projection=true projects the class token alone")
            + ": set teacher.feature=cls"
        )
    if cfg.checkpoint == "random":
        if cfg.projection:
            raise ValueError(f"teacher {name!r}: teacher.projection=true needs a checkpoint with a projection head")
        log.warning("teacher %s: checkpoint=random: %s is UNTRAINED, its features are noise", name, cfg.arch)
        with torch.device(device):  # init on the device: on a GPU, resnet50x4's 375M parameters take no time
            backbone, projection = arch.build(), None
    else:
        backbone, projection = _load_backbone(cfg)
    if cfg.arch in DINOV2_OFFSET_INTERPOLATION and cfg.input_size is not None:
        resample_as_dinov2(backbone, cfg.input_size)
    dim = _projection_dim(projection) if projection is not None else arch.dim * (1 + (cfg.feature == "cls_avgpool"))
    feature = None if arch.conv else cfg.feature
    teacher = Teacher(name, cfg.arch, backbone, dim, projection, amp_dtype, feature, cfg.input_size)
    stored = stored_dtype(cfg, sum(p.numel() for p in backbone.parameters()), amp_dtype, arch.conv)
    if arch.conv and (
        cfg.inference == "folded" or (cfg.inference == "auto" and torch.device(device).type == "cuda") or cfg.compile
    ):
        log.info(
            "teacher %s: %d BatchNorms folded into their convolutions, weights in %s%s",
            name,
            teacher.fold(stored),
            teacher.backbone_dtype,
            ", compiled with inductor's freezing" if cfg.compile else "",
        )
        if cfg.compile:
            teacher.backbone = torch.compile(
                teacher.backbone, fullgraph=True, dynamic=False, options={"freezing": True}
            )
    elif stored:
        teacher.store_in(stored)
        log.info("teacher %s: weights stored and run in %s (teacher.dtype=%s), no autocast", name, stored, cfg.dtype)
    else:
        log.info(
            "teacher %s: run as loaded, under autocast (%s)",
            name,
            f"teacher.inference={cfg.inference} on {torch.device(device).type}"
            if arch.conv
            else "a transformer: no BatchNorm to fold",
        )
    # channels_last: the layout the loaders yield (trainer.channels_last) and cuDNN's fastest for convolutions
    return teacher.to(device, memory_format=torch.channels_last if arch.conv else torch.contiguous_format)
