"""SEED's students as SEED built them: every parameter and buffer name and shape against a table written out from
the official code (jacobswan1/SEED seed/architectures/mobilenet/mobilenetv3.py; lukemelas' EfficientNet-PyTorch
0.7.0 as seed/architectures/efficientnet copies it), and the settings that are not parameters (BatchNorm eps and
momentum, padding, the SE's place, dropout, drop-connect) as attributes or a forward written out by hand."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from timm.layers import Conv2dSame
from torch import nn

from fastreg.config import to_config
from fastreg.students import STUDENTS, SeedMobileNetV3Large, SqueezeExcite

Table = list[tuple[str, tuple[int, ...]]]  # (state_dict key, shape), in state_dict order


def batch_norm(name: str, c: int) -> Table:
    return [(f"{name}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{name}.num_batches_tracked", ())
    ]


# ------------------------------------------------------------------------------------------- SEED's MobileNet-v3-L

# mobilenetv3.py mobilenetv3_large's cfgs as SEED writes them: kernel, expansion factor t, output width c, SE, h-swish,
# stride; the expanded width is _make_divisible(input width x t, 8)
SEED_MOBILENET_V3_LARGE_CFGS = [
    (3, 1, 16, 0, 0, 1),
    (3, 4, 24, 0, 0, 2),
    (3, 3, 24, 0, 0, 1),
    (5, 3, 40, 1, 0, 2),
    (5, 3, 40, 1, 0, 1),
    (5, 3, 40, 1, 0, 1),
    (3, 6, 80, 0, 1, 2),
    (3, 2.5, 80, 0, 1, 1),
    (3, 2.3, 80, 0, 1, 1),
    (3, 2.3, 80, 0, 1, 1),
    (3, 6, 112, 1, 1, 1),
    (3, 6, 112, 1, 1, 1),
    (5, 6, 160, 1, 1, 2),
    (5, 6, 160, 1, 1, 1),
    (5, 6, 160, 1, 1, 1),
]


def divisible_by_8(v: float) -> int:
    """mobilenetv3.py _make_divisible(v, 8): to the nearest multiple of 8, at least 8, plus 8 if that lost over 10%."""
    r = max(8, int(v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


def seed_mobilenet_v3_large_table() -> Table:
    """mobilenetv3.py MobileNetV3(cfgs, 'large'): features.0 = conv_3x3_bn(3, 16, 2); features.i = InvertedResidual,
    whose `conv` is [dw 0, BN 1, act 2, SE/Identity 3, pw 4, BN 5] when the input width equals the expanded one, else
    [pw 0, BN 1, act 2, dw 3, BN 4, SE/Identity 5, act 6, pw-linear 7, BN 8]; SELayer.fc = [Linear 0, ReLU, Linear 2,
    h_sigmoid] through _make_divisible(c // 4, 8); then conv = conv_1x1_bn(160, 960), classifier = [Linear(960, 1280),
    h_swish, Dropout], fc = Linear(1280, 1000)."""
    table = [("features.0.0.weight", (16, 3, 3, 3)), *batch_norm("features.0.1", 16)]
    c_in = 16
    for i, (k, t, c, se, _, _) in enumerate(SEED_MOBILENET_V3_LARGE_CFGS, start=1):
        hidden, p = divisible_by_8(c_in * t), f"features.{i}.conv"
        mid = divisible_by_8(hidden // 4)
        squeeze = [(f"{p}.{{}}.fc.0.weight", (mid, hidden)), (f"{p}.{{}}.fc.0.bias", (mid,))]
        squeeze += [(f"{p}.{{}}.fc.2.weight", (hidden, mid)), (f"{p}.{{}}.fc.2.bias", (hidden,))]
        depthwise = (hidden, 1, k, k)
        if c_in == hidden:
            table += [(f"{p}.0.weight", depthwise), *batch_norm(f"{p}.1", hidden)]
            table += [(n.format(3), s) for n, s in squeeze] if se else []
            table += [(f"{p}.4.weight", (c, hidden, 1, 1)), *batch_norm(f"{p}.5", c)]
        else:
            table += [(f"{p}.0.weight", (hidden, c_in, 1, 1)), *batch_norm(f"{p}.1", hidden)]
            table += [(f"{p}.3.weight", depthwise), *batch_norm(f"{p}.4", hidden)]
            table += [(n.format(5), s) for n, s in squeeze] if se else []
            table += [(f"{p}.7.weight", (c, hidden, 1, 1)), *batch_norm(f"{p}.8", c)]
        c_in = c
    table += [("conv.0.weight", (960, 160, 1, 1)), *batch_norm("conv.1", 960)]
    table += [("classifier.0.weight", (1280, 960)), ("classifier.0.bias", (1280,))]
    return table + [("fc.weight", (1000, 1280)), ("fc.bias", (1000,))]


def n_parameters(table: Table) -> int:
    """The values of the table's parameters (BatchNorm's running statistics are buffers)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(shape) for name, shape in table if not name.endswith(buffers))


def shapes(model: nn.Module) -> Table:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_seed_mobilenet_v3_has_seeds_parameter_table():
    """Names, shapes and order equal SEED's: SEED's checkpoints load by name. SE layers are Linear (2-d weights)
    where torchvision's and timm's are 1x1 convs, so no torchvision or timm model has this table."""
    expected = seed_mobilenet_v3_large_table()
    assert shapes(SeedMobileNetV3Large()) == expected
    # spot values from reading the file: the 10% rule makes the first SE 24 wide (72 // 4 = 18 rounds to 16 < 16.2)
    assert dict(expected)["features.4.conv.5.fc.0.weight"] == (24, 72)
    assert dict(expected)["features.8.conv.0.weight"] == (200, 80, 1, 1)  # 80 x 2.5
    assert dict(expected)["features.9.conv.0.weight"] == (184, 80, 1, 1)  # 80 x 2.3 = 184
    assert n_parameters(expected) == 5_483_032  # as many as torchvision's MobileNet-v3-L: the same layers' widths


def test_seed_mobilenet_v3_batch_norm_and_padding_are_torchs_defaults():
    """SEED's nn.BatchNorm2d(c) (eps 1e-5, momentum 0.1), not torchvision's (1e-3, 0.01); convs pad (k - 1) / 2."""
    model = SeedMobileNetV3Large()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 2 + 14 * 3 + 1 and {(m.eps, m.momentum) for m in norms} == {(1e-5, 0.1)}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.padding == ((m.kernel_size[0] - 1) // 2,) * 2 for m in convs)
    assert model.classifier[2].p == 0.2


def test_seed_mobilenet_v3_block_applies_its_se_before_the_activation():
    """SEED's features[12] (k3, 112 -> 672 -> 112, SE, h-swish, stride 1, residual), written out with F: SE on the
    depthwise conv's BN output, then h-swish. Put after the activation (torchvision, timm), the output differs."""
    torch.manual_seed(0)
    block = SeedMobileNetV3Large().features[12].eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a wrong order shows
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_(1, 0.3)
        c = block.conv

        def bn(i, x):
            return F.batch_norm(x, c[i].running_mean, c[i].running_var, c[i].weight, c[i].bias, eps=1e-5)

        def squeeze(x):  # x * h-sigmoid(Linear(ReLU(Linear(mean))))
            reduce, expand = c[5].fc[0], c[5].fc[2]
            y = F.linear(F.relu(F.linear(x.mean(dim=(2, 3)), reduce.weight, reduce.bias)), expand.weight, expand.bias)
            return x * (F.relu6(y + 3) / 6)[:, :, None, None]

        def hswish(x):
            return x * F.relu6(x + 3) / 6

        x = torch.randn(2, 112, 7, 7)
        h = hswish(bn(1, F.conv2d(x, c[0].weight)))  # (2, 672, 7, 7)
        h = bn(4, F.conv2d(h, c[3].weight, padding=1, groups=672))
        expected = x + bn(8, F.conv2d(hswish(squeeze(h)), c[7].weight))
        torch.testing.assert_close(block(x), expected)
        assert isinstance(c[5], SqueezeExcite)
        swapped = x + bn(8, F.conv2d(squeeze(hswish(h)), c[7].weight))
        assert not torch.allclose(block(x), swapped, atol=1e-3)


# ------------------------------------------------------------------------------------- SEED's EfficientNet-B0

# lukemelas' utils.py efficientnet(): the blocks as TF's strings (repeats, kernel, stride, expansion, in, out, SE 0.25)
LUKEMELAS_B0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]


def lukemelas_b0_table() -> Table:
    """model.py EfficientNet as SEED's copy has it (`fc` where lukemelas' has `_fc`): _conv_stem, _bn0, _blocks,
    _conv_head, _bn1, fc. MBConvBlock: [_expand_conv, _bn0 when the expansion is not 1], _depthwise_conv, _bn1,
    _se_reduce/_se_expand (1x1 convs with bias, max(1, int(block input x 0.25)) wide), _project_conv, _bn2. A
    stage's first block takes its input width, the next ones its output width."""
    table, n = [("_conv_stem.weight", (32, 3, 3, 3)), *batch_norm("_bn0", 32)], 0
    for spec in LUKEMELAS_B0_BLOCKS:
        f = block_options(spec)
        for r in range(int(f["r"])):
            c_in, c_out, k = int(f["i"] if r == 0 else f["o"]), int(f["o"]), int(f["k"])
            c_mid, squeezed, p = c_in * int(f["e"]), max(1, int(c_in * f["se"])), f"_blocks.{n}"
            if f["e"] != 1:
                table += [(f"{p}._expand_conv.weight", (c_mid, c_in, 1, 1)), *batch_norm(f"{p}._bn0", c_mid)]
            table += [(f"{p}._depthwise_conv.weight", (c_mid, 1, k, k)), *batch_norm(f"{p}._bn1", c_mid)]
            table += [(f"{p}._se_reduce.weight", (squeezed, c_mid, 1, 1)), (f"{p}._se_reduce.bias", (squeezed,))]
            table += [(f"{p}._se_expand.weight", (c_mid, squeezed, 1, 1)), (f"{p}._se_expand.bias", (c_mid,))]
            table += [(f"{p}._project_conv.weight", (c_out, c_mid, 1, 1)), *batch_norm(f"{p}._bn2", c_out)]
            n += 1
    table += [("_conv_head.weight", (1280, 320, 1, 1)), *batch_norm("_bn1", 1280)]
    return table + [("fc.weight", (1000, 1280)), ("fc.bias", (1000,))]


def block_options(spec: str) -> dict[str, float]:
    """'r2_k3_s22_e6_i16_o24_se0.25' -> {'r': 2, 'k': 3, 's': 22, 'e': 6, 'i': 16, 'o': 24, 'se': 0.25}"""
    return {
        key: float(value) for key, value in (re.fullmatch(r"([a-z]+)([\d.]+)", p).groups() for p in spec.split("_"))
    }


# lukemelas' name -> timm's, inside a block: MBConvBlock -> timm's InvertedResidual, and for the first block (no
# expansion) -> timm's DepthwiseSeparableConv, whose BN and conv are numbered from its depthwise conv
IN_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
IN_FIRST_BLOCK = {**IN_BLOCK, "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
OUTSIDE = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "fc": "classifier"}


def timm_name(lukemelas: str) -> str:
    """The name map: _blocks.<n> is timm's blocks.<stage>.<index in stage>, stages as the repeats (1, 2, 2, 3, 3, 4, 1)."""
    parts = lukemelas.split(".")
    if parts[0] != "_blocks":
        return ".".join([OUTSIDE[parts[0]], *parts[1:]])
    n, repeats = int(parts[1]), [int(block_options(s)["r"]) for s in LUKEMELAS_B0_BLOCKS]
    stage = next(s for s in range(len(repeats)) if n < sum(repeats[: s + 1]))
    names = IN_FIRST_BLOCK if n == 0 else IN_BLOCK
    return ".".join(["blocks", str(stage), str(n - sum(repeats[:stage])), names[parts[2]], *parts[3:]])


def test_efficientnet_b0_tf_has_lukemelas_parameter_table_under_timms_names():
    """timm names lukemelas' tensors differently: the comparison is through the name map above (one-to-one: the
    mapped table equals timm's, every name, shape and position), not shapes in order alone."""
    expected = lukemelas_b0_table()
    assert len(expected) == 360 and len({timm_name(n) for n, _ in expected}) == 360
    assert [(timm_name(n), s) for n, s in expected] == shapes(STUDENTS["efficientnet_b0_tf"].network())
    # spot values from reading the file: the SE squeezes the block's input (16 x 0.25 = 4), not the expanded 96
    assert dict(expected)["_blocks.1._se_reduce.weight"] == (4, 96, 1, 1)
    assert n_parameters(expected) == 5_288_548  # EfficientNet-B0's 5.3M


def test_efficientnet_b0_tf_has_tfs_batch_norm_padding_dropout_and_drop_connect():
    """BN momentum 0.01 (TF's 0.99) and eps 1e-3; TF "SAME" padding (stride 2: timm's Conv2dSame pads as TF, the
    extra row and column after; stride 1: symmetric); Dropout(0.2) before the fc; drop-connect 0.2 x n / 16 in
    block n (model.py extract_features: drop_connect_rate * idx / len(self._blocks))."""
    model = STUDENTS["efficientnet_b0_tf"].network()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 2 + 15 * 3 + 1 and {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.01)}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, Conv2dSame) == (m.stride == (2, 2)) for m in convs)
    assert all(m.padding == ((m.kernel_size[0] - 1) // 2,) * 2 for m in convs if m.stride == (1, 1))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # TF SAME on 32 px: k3 s2 pads (0, 1); k5 s2 pads (1, 2)
        torch.testing.assert_close(
            model.conv_stem(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), model.conv_stem.weight, stride=2)
        )
        dw, h = model.blocks[2][0].conv_dw, torch.randn(1, 144, 16, 16)
        torch.testing.assert_close(dw(h), F.conv2d(F.pad(h, (1, 2, 1, 2)), dw.weight, stride=2, groups=144))
    assert model.drop_rate == 0.2
    blocks = [b for stage in model.blocks for b in stage]
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks] == pytest.approx([0.2 * n / 16 for n in range(16)])


def test_efficientnet_b0_tf_starts_from_torchs_default_initialization():
    """lukemelas' model keeps torch's init (kaiming-uniform, a=sqrt(5): |w| <= 1 / sqrt(fan_in)); timm's own is TF's
    normal(0, sqrt(2 / fan_out)), which exceeds that bound."""
    model = STUDENTS["efficientnet_b0_tf"].network()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= 1 / math.sqrt(fan_in), name


# ----------------------------------------------------------------------------------------------- the recipes

RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "experiment").glob("seed_*.yaml"))


@pytest.mark.parametrize("experiment", RECIPES)
def test_seed_recipes_train_seeds_students(experiment):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        overrides = [
            f"experiment={experiment}",
            "teacher.checkpoint=random",
            "data.root=/d/train",
            "trainer.out_dir=/tmp/x",
        ]
        cfg = to_config(compose("config", overrides=overrides))
    assert cfg.student.arch == ("efficientnet_b0_tf" if "_effb0" in experiment else "mobilenet_v3_large_seed")
