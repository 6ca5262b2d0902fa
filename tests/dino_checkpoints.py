"""Synthetic DINOv2 / DINOv3 checkpoints in the official release layouts, for tests/test_dino_teachers.py.

Key names and shapes are written out here from the official code (read, not imported or copied), not derived from
timm, so that timm's checkpoint filter loading them (strict) is a check of both:

DINOv2 (facebookresearch/dinov2: models/vision_transformer.py, layers/, hub/backbones.py, train/train.py):
- hub .pth: plain keys. cls_token (1, 1, D); pos_embed (1, 1 + g*g, D) with g = img_size / patch, img_size 518 in
  the hub (37 x 37 at patch 14); register_tokens (1, n, D) when num_register_tokens > 0; mask_token (1, D) (iBOT only);
  patch_embed.proj (D, 3, 14, 14); blocks.<i>.{norm1, attn.qkv (3D, D) with bias, attn.proj, ls1.gamma, norm2, mlp,
  ls2.gamma}; norm. mlp: fc1/fc2 (Mlp, ratio 4), or for ViT-g w12 (2h, D) / w3 (D, h) (SwiGLUFFNFused,
  h = (int(4D * 2/3) + 7) // 8 * 8). LayerScale: init_values=1.0 in the hub, so ls1/ls2 exist.
- training: train.py's do_test saves {"teacher": model.teacher.state_dict()}: backbone.*, dino_head.* (DINOHead: mlp.0,
  mlp.2, mlp.4, last_layer.weight_g / weight_v of the weight-normed last layer) and ibot_head.* (separate_head).
  The backbone is built at crops.global_crops_size (224: a 16 x 16 pos_embed grid at patch 14), and with
  block_chunks > 0 its blocks are BlockChunks padded with Identity so that each block keeps its global index:
  blocks.<chunk>.<i>.* with i the block's index in the whole network.

DINOv3 (facebookresearch/dinov3: models/vision_transformer.py, layers/, hub/backbones.py):
- hub .pth: plain keys. cls_token (1, 1, D); storage_tokens (1, 4, D); mask_token (1, D); patch_embed.proj (D, 3, 16,
  16); rope_embed.periods (D_head // 4,), a persistent buffer base ** (2 k / (D_head / 2)), base 100, stored in
  pos_embed_rope_dtype (fp32 in the hub builders, bf16 the class default the training uses); blocks.<i>.{norm1,
  attn.qkv.weight, attn.qkv.bias + attn.qkv.bias_mask (LinearKMaskedBias, mask_k_bias: the mask is 1 except 0 on the
  middle third, the K bias), attn.proj, ls1.gamma, norm2, mlp, ls2.gamma}; norm; local_cls_norm where
  untie_global_and_local_cls_norm (7B; the L/16 SAT-493M weights). mlp: fc1/fc2 (ratio 4), or SwiGLUFFN w1, w2 (h, D),
  w3 (D, h) with h = int(D * ratio * 2/3) rounded up to align_to (8; 64 for 7B). 7B has qkv_bias=False: no qkv.bias.
- training: the teacher's state_dict, backbone.* next to dino_head.* and ibot_head.*.

timm's DINOv3 models without `_qkvb` have no q/v bias (timm.models.eva.checkpoint_filter_fn drops qkv.bias for
them: "the distilled b,l,h models ended up with all zero biases"), so a file they run exactly has qkv.bias all zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Official:
    """One official network's hyperparameters, as its hub builder sets them."""

    family: str  # dinov2 | dinov3
    dim: int
    depth: int
    heads: int
    ffn: str = "mlp"  # mlp | swiglu (DINOv2: SwiGLUFFNFused w12/w3; DINOv3: SwiGLUFFN w1/w2/w3)
    ffn_ratio: float = 4.0
    align_to: int = 8  # DINOv3 SwiGLU hidden alignment
    n_tokens: int = 0  # DINOv2 register_tokens / DINOv3 storage_tokens
    patch: int = 14
    img_size: int = 518  # DINOv2: the pos_embed grid is img_size // patch
    qkv_bias: bool = True
    local_cls_norm: bool = False  # DINOv3 untie_global_and_local_cls_norm
    rope_base: float = 100.0


def _v2(dim: int, depth: int, heads: int, regs: int = 0, ffn: str = "mlp") -> Official:
    return Official("dinov2", dim, depth, heads, ffn=ffn, n_tokens=regs)


def _v3(dim: int, depth: int, heads: int, ffn: str = "mlp", ratio: float = 4.0, **kw) -> Official:
    return Official("dinov3", dim, depth, heads, ffn=ffn, ffn_ratio=ratio, n_tokens=4, patch=16, img_size=224, **kw)


# teacher.arch (timm's name) -> the official network (dinov2 hub/backbones.py + models; dinov3 hub/backbones.py)
OFFICIAL: dict[str, Official] = {
    "vit_small_patch14_dinov2": _v2(384, 12, 6),
    "vit_base_patch14_dinov2": _v2(768, 12, 12),
    "vit_large_patch14_dinov2": _v2(1024, 24, 16),
    "vit_giant_patch14_dinov2": _v2(1536, 40, 24, ffn="swiglu"),
    "vit_small_patch14_reg4_dinov2": _v2(384, 12, 6, regs=4),
    "vit_base_patch14_reg4_dinov2": _v2(768, 12, 12, regs=4),
    "vit_large_patch14_reg4_dinov2": _v2(1024, 24, 16, regs=4),
    "vit_giant_patch14_reg4_dinov2": _v2(1536, 40, 24, regs=4, ffn="swiglu"),
    "vit_small_patch16_dinov3": _v3(384, 12, 6),
    "vit_small_plus_patch16_dinov3": _v3(384, 12, 6, ffn="swiglu", ratio=6.0),
    "vit_base_patch16_dinov3": _v3(768, 12, 12),
    "vit_large_patch16_dinov3": _v3(1024, 24, 16),
    "vit_huge_plus_patch16_dinov3": _v3(1280, 32, 20, ffn="swiglu", ratio=6.0),
    "vit_7b_patch16_dinov3": _v3(
        4096, 40, 32, ffn="swiglu", ratio=3.0, align_to=64, qkv_bias=False, local_cls_norm=True
    ),
}


def _hidden(spec: Official) -> int:
    h = int(spec.dim * spec.ffn_ratio)
    if spec.ffn == "mlp":
        return h
    if spec.family == "dinov2":  # SwiGLUFFNFused
        return (int(h * 2 / 3) + 7) // 8 * 8
    d = int(h * 2 / 3)  # DINOv3 SwiGLUFFN
    return d + (-d % spec.align_to)


def official_shapes(spec: Official, pos_grid: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of the official backbone's state_dict and its shape, in the official module order."""
    d, p = spec.dim, spec.patch
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d)}
    if spec.family == "dinov2":
        g = pos_grid or spec.img_size // p
        shapes["pos_embed"] = (1, 1 + g * g, d)
        if spec.n_tokens:
            shapes["register_tokens"] = (1, spec.n_tokens, d)
        shapes["mask_token"] = (1, d)
    else:
        shapes["storage_tokens"] = (1, spec.n_tokens, d)
        shapes["mask_token"] = (1, d)
        shapes["rope_embed.periods"] = (d // spec.heads // 4,)
    shapes["patch_embed.proj.weight"] = (d, 3, p, p)
    shapes["patch_embed.proj.bias"] = (d,)
    h = _hidden(spec)
    for i in range(spec.depth):
        b = f"blocks.{i}."
        shapes[b + "norm1.weight"] = shapes[b + "norm1.bias"] = (d,)
        shapes[b + "attn.qkv.weight"] = (3 * d, d)
        if spec.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
            if spec.family == "dinov3":
                shapes[b + "attn.qkv.bias_mask"] = (3 * d,)
        shapes[b + "attn.proj.weight"] = (d, d)
        shapes[b + "attn.proj.bias"] = (d,)
        shapes[b + "ls1.gamma"] = (d,)
        shapes[b + "norm2.weight"] = shapes[b + "norm2.bias"] = (d,)
        if spec.ffn == "mlp":
            mlp = {"fc1.weight": (h, d), "fc1.bias": (h,), "fc2.weight": (d, h), "fc2.bias": (d,)}
        elif spec.family == "dinov2":
            mlp = {"w12.weight": (2 * h, d), "w12.bias": (2 * h,), "w3.weight": (d, h), "w3.bias": (d,)}
        else:
            mlp = {"w1.weight": (h, d), "w1.bias": (h,), "w2.weight": (h, d), "w2.bias": (h,)}
            mlp |= {"w3.weight": (d, h), "w3.bias": (d,)}
        shapes |= {f"{b}mlp.{k}": s for k, s in mlp.items()}
        shapes[b + "ls2.gamma"] = (d,)
    shapes["norm.weight"] = shapes["norm.bias"] = (d,)
    if spec.local_cls_norm:
        shapes["local_cls_norm.weight"] = shapes["local_cls_norm.bias"] = (d,)
    return shapes


def rope_periods(spec: Official, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DINOv3's RopePositionEmbedding periods with `base`: base ** (2 k / (D_head / 2)), k < D_head / 4, computed in
    `dtype` (the buffer's dtype) as the official _init_weights does."""
    d_head = spec.dim // spec.heads
    return spec.rope_base ** (2 * torch.arange(d_head // 4, dtype=dtype) / (d_head // 2))


def _value(key: str, shape: tuple[int, ...], spec: Official, g: torch.Generator) -> torch.Tensor:
    """A random tensor for one key: non-trivial everywhere, at scales that keep a forward well-conditioned."""
    if key.endswith("bias_mask"):  # LinearKMaskedBias: ones, the K third zero
        mask = torch.ones(shape)
        mask[shape[0] // 3 : 2 * shape[0] // 3] = 0
        return mask
    if key == "rope_embed.periods":
        return rope_periods(spec)
    if key.endswith("qkv.bias") and spec.family == "dinov3":
        return torch.zeros(shape)  # see the module doc: timm's DINOv3 models have no q/v bias; K is masked anyway
    if key.endswith("gamma") or "norm" in key and key.endswith("weight"):
        return torch.empty(shape).uniform_(0.5, 1.5, generator=g)
    if key.endswith("weight") and len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return torch.randn(shape, generator=g) * 0.1  # biases, tokens, pos_embed


def official_state_dict(spec: Official, seed: int = 0, device: str | torch.device = "cpu", **shape_kw) -> StateDict:
    """The official hub .pth's state_dict of `spec`, with seeded random values (device='meta': shapes only)."""
    shapes = official_shapes(spec, **shape_kw)
    if torch.device(device).type == "meta":
        dtypes = {"rope_embed.periods": torch.float32}
        return {k: torch.empty(s, device="meta", dtype=dtypes.get(k, torch.float32)) for k, s in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    return {k: _value(k, s, spec, g) for k, s in shapes.items()}


def chunk_blocks(sd: StateDict, depth: int, chunks: int) -> StateDict:
    """DINOv2 block_chunks: blocks.<i>.* -> blocks.<i // (depth // chunks)>.<i>.* (the Identity padding keeps i)."""
    size = depth // chunks
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks.") :].split(".", 1)
            k = f"blocks.{int(i) // size}.{i}.{rest}"
        out[k] = v
    return out


def _dino_head(in_dim: int, g: torch.Generator, hidden: int = 32, bottleneck: int = 16, out: int = 64) -> StateDict:
    """A (small) DINOHead's keys: mlp.0 / mlp.2 / mlp.4 Linear, GELUs between; last_layer weight-normed, no bias."""
    dims = [(hidden, in_dim), (hidden, hidden), (bottleneck, hidden)]
    sd = {}
    for i, (o, n) in zip((0, 2, 4), dims):
        sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"] = torch.randn(o, n, generator=g), torch.randn(o, generator=g)
    sd["last_layer.weight_g"] = torch.ones(out, 1)
    sd["last_layer.weight_v"] = torch.randn(out, bottleneck, generator=g)
    return sd


def training_checkpoint(backbone: StateDict, dim: int, seed: int = 0) -> dict:
    """{"teacher": {backbone.*, dino_head.*, ibot_head.*}}: the teacher's state_dict as DINOv2's train.py do_test saves
    it (teacher_checkpoint.pth), which is also the DINOv3 training teacher's layout."""
    g = torch.Generator().manual_seed(seed + 1000)
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher |= {f"dino_head.{k}": v for k, v in _dino_head(dim, g).items()}
    teacher |= {f"ibot_head.{k}": v for k, v in _dino_head(dim, g).items()}
    return {"teacher": teacher}


def dinov2_training(spec: Official, seed: int = 0, chunks: int = 4, crop: int = 224) -> tuple[dict, StateDict]:
    """(DINOv2 training checkpoint, the same backbone in hub layout): built at the global crop size (pos_embed grid
    crop // patch), blocks chunked."""
    hub = official_state_dict(spec, seed, pos_grid=crop // spec.patch)
    return training_checkpoint(chunk_blocks(hub, spec.depth, chunks), spec.dim, seed), hub


def dinov3_training(spec: Official, seed: int = 0) -> tuple[dict, StateDict]:
    """(DINOv3 training teacher, the same backbone in hub layout): periods in bf16, the class default dtype."""
    hub = official_state_dict(spec, seed)
    backbone = dict(hub, **{"rope_embed.periods": rope_periods(spec, torch.bfloat16)})
    return training_checkpoint(backbone, spec.dim, seed), hub


def with_spec(arch: str, **changes) -> Official:
    return replace(OFFICIAL[arch], **changes)
