"""Student registry: the papers' backbones without their final classifier Linear, plus small CNNs for the demo.

A student maps images (B, 3, H, W) to its feature (B, dim): the input of the final Linear of the network the
paper trained, so SEED's MobileNet-v3-L and EfficientNet-B0 keep their last Linear/h-swish and Dropout(0.2).
Its `backbone` keeps the module names of the library it came from (torchvision, timm, or SeedMobileNetV3Large
below, SEED's own network), so `backbone.state_dict()` loads into that library's whole network with only the
classifier Linear's keys missing (see fastreg.export).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import timm
import torch
from torch import nn
from torchvision import models as tvm


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages, each followed by a 2x max-pool, then global average pooling.

    The embedded demo's teacher (32-64-128) and student (16-32-64). `fc` is the classifier used only
    when the demo trains its teacher with labels; `num_classes=0` leaves it out.
    """

    def __init__(self, widths: Sequence[int], num_classes: int = 0):
        super().__init__()
        layers, c_in = [], 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)
        return self.fc(x)


def drop_module(model: nn.Module, name: str) -> nn.Module:
    """Replace the submodule `name` ("fc", "classifier", "classifier.3") by Identity: forward() then skips it."""
    model.set_submodule(name, nn.Identity())
    return model


class StudentArch(NamedTuple):
    build: Callable[[], nn.Module]  # the backbone, with its library's module names: (B, 3, H, W) -> (B, dim)
    dim: int  # width of its feature: what the heads, the k-NN and the linear probe see
    # The name in `network` of the classifier Linear the student drops: an exported student lacks its keys, and only
    # those (fastreg.export.check_keys). None: the demo CNNs, which load strictly into Student(arch).backbone.
    final_linear: str | None
    network: Callable[[], nn.Module] | None = None  # the whole network, as the library the student came from builds it
    network_code: str | None = None  # the same as the Python line a user runs (fastreg.export.load_hint)


def torchvision_student(arch: str, dim: int, dropped: str, final_linear: str | None = None) -> StudentArch:
    """torchvision's `arch` with its submodule `dropped` replaced by Identity; `final_linear` (default: `dropped`) is
    the classifier Linear inside it."""
    network = partial(tvm.get_model, arch)
    return StudentArch(
        lambda: drop_module(network(), dropped), dim, final_linear or dropped, network, f"torchvision.models.{arch}()"
    )


# SEED's EfficientNet-B0 (seed/architectures/efficientnet: lukemelas' EfficientNet-PyTorch 0.7.0,
# EfficientNet.from_name('efficientnet-b0')) is the TF port: TF "SAME" padding, BatchNorm momentum 0.01 (TF's 0.99)
# and eps 1e-3, drop-connect 0.2 x block index / 16, Dropout(0.2) on the pooled feature before its fc. timm's
# tf_efficientnet_b0 is the same port (its own names for the same tensors, in the same order); timm leaves BatchNorm's
# momentum at torch's 0.1 unless told. Padding: lukemelas' pads are fixed for 224 px inputs, timm's are computed
# for the input at hand (TF's "SAME"): the same at every crop whose side is a multiple of 32 (224, SEED's 96-px patches)
TF_EFFICIENTNET_B0 = dict(bn_momentum=0.01, drop_rate=0.2, drop_path_rate=0.2)


def tf_efficientnet_b0() -> nn.Module:
    """timm's tf_efficientnet_b0 as SEED trained it, with torch's default initialization, as lukemelas' model has
    (timm's own is TF's)."""
    model = timm.create_model("tf_efficientnet_b0", **TF_EFFICIENTNET_B0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            m.reset_parameters()
    return model


# MobileNet-v3-Large's blocks (Howard et al. 2019, Table 1; SEED's mobilenetv3.py mobilenetv3_large gives the same
# widths as input x expansion factor, rounded to 8): kernel, expanded width, output width, SE, h-swish, stride
MOBILENET_V3_LARGE = (
    (3, 16, 16, False, False, 1),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2),
    (5, 120, 40, True, False, 1),
    (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2),
    (3, 200, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 480, 112, True, True, 1),
    (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2),
    (5, 960, 160, True, True, 1),
    (5, 960, 160, True, True, 1),
)


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, padding (kernel - 1) / 2) + BatchNorm at torch's defaults (eps 1e-5, momentum 0.1), as SEED's."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class SqueezeExcite(nn.Module):
    """x * h-sigmoid(fc(mean of x over H, W)), fc = Linear(c, c/4 rounded to 8) + ReLU + Linear back: Linear layers
    where torchvision and timm have 1x1 convs."""

    def __init__(self, c: int):
        super().__init__()
        mid = make_divisible(c // 4)
        self.fc = nn.Sequential(nn.Linear(c, mid), nn.ReLU(inplace=True), nn.Linear(mid, c), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]  # (B, C, H, W) * (B, C, 1, 1)


def make_divisible(v: float, divisor: int = 8) -> int:
    """TF MobileNet's rounding: the nearest multiple of `divisor`, at least `divisor`, never 10% below v."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


class SeedInvertedResidual(nn.Module):
    """SEED's block: [expand 1x1 + BN + act], depthwise + BN, SE, then the activation (SE before it, where torchvision
    and timm put it after), project 1x1 + BN; a residual when the shape is kept. Without expansion (the first block)
    the activation comes before the SE, as in SEED's."""

    def __init__(self, c_in: int, hidden: int, c_out: int, kernel: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        squeeze = SqueezeExcite(hidden) if se else nn.Identity()
        if c_in == hidden:
            layers = [*depthwise, act(inplace=True), squeeze, *conv_bn(hidden, c_out)]
        else:
            layers = [*conv_bn(c_in, hidden), act(inplace=True), *depthwise, squeeze, act(inplace=True)]
            layers += conv_bn(hidden, c_out)
        self.conv = nn.Sequential(*layers)  # SEED's module indices: its checkpoints load by name
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class SeedMobileNetV3Large(nn.Module):
    """SEED's MobileNet-v3-Large (seed/architectures/mobilenet/mobilenetv3.py, mobilenetv3_large), with its module
    names: features (stem + 15 blocks), conv (1x1 to 960), avgpool, classifier = Linear(960, 1280) + h-swish +
    Dropout(0.2), fc. BatchNorm at torch's defaults; SEED's initialization (normal convs by fan-out, Linear N(0, 0.01))."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [nn.Sequential(*conv_bn(3, 16, 3, 2), nn.Hardswish(inplace=True))], 16
        for kernel, hidden, c_out, se, hswish, stride in MOBILENET_V3_LARGE:
            layers.append(SeedInvertedResidual(c_in, hidden, c_out, kernel, stride, se, hswish))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.conv = nn.Sequential(*conv_bn(c_in, 960), nn.Hardswish(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(inplace=True), nn.Dropout(0.2))
        self.fc = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (k * k * out channels))
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.conv(self.features(x))).flatten(1)  # (B, 960)
        return self.fc(self.classifier(x))  # (B, num_classes)


STUDENTS: dict[str, StudentArch] = {
    "resnet18": torchvision_student("resnet18", 512, "fc"),
    "resnet34": torchvision_student("resnet34", 512, "fc"),
    "resnet50": torchvision_student("resnet50", 2048, "fc"),
    # SimReg's MobileNet-v2 (UCDvision/simreg models/mobilenet.py, MobileNetV2._forward_impl) pools into its fc with
    # no dropout: drop torchvision's whole classifier, Dropout(0.2) + Linear
    "mobilenet_v2": torchvision_student("mobilenet_v2", 1280, "classifier", "classifier.1"),
    # SEED's MobileNet-v3-L (seed/architectures/mobilenet/mobilenetv3.py, MobileNetV3.__init__) ends with
    # classifier = Linear(960, 1280), h_swish, Dropout(0.2) before its fc: its feature is 1280-d. torchvision's
    # classifier[0:3] is the same Linear + Hardswish + Dropout(0.2); only classifier[3], the 1000-way Linear, goes.
    # torchvision's blocks differ from SEED's (BN eps 1e-3, SE after the activation): mobilenet_v3_large_seed is SEED's
    "mobilenet_v3_large": torchvision_student("mobilenet_v3_large", 1280, "classifier.3"),
    "mobilenet_v3_large_seed": StudentArch(
        lambda: drop_module(SeedMobileNetV3Large(), "fc"),
        1280,
        "fc",
        SeedMobileNetV3Large,
        "fastreg.students.SeedMobileNetV3Large()",
    ),
    # SEED's EfficientNet-B0 (seed/architectures/efficientnet/model.py, EfficientNet.forward) applies Dropout(0.2)
    # to the pooled feature before its fc: keep torchvision's classifier[0] (Dropout), drop classifier[1].
    # torchvision's is not the TF port SEED used: efficientnet_b0_tf is
    "efficientnet_b0": torchvision_student("efficientnet_b0", 1280, "classifier.1"),
    # timm's forward pools, applies Dropout(drop_rate), then its classifier: dropping the classifier keeps the Dropout
    "efficientnet_b0_tf": StudentArch(
        lambda: drop_module(tf_efficientnet_b0(), "classifier"),
        1280,
        "classifier",
        tf_efficientnet_b0,
        "timm.create_model('tf_efficientnet_b0')",
    ),
    "cnn_tiny": StudentArch(lambda: SmallCNN((16, 32, 64)), 64, None),
    "cnn_small": StudentArch(lambda: SmallCNN((32, 64, 128)), 128, None),
}


class Student(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        if arch not in STUDENTS:
            raise ValueError(f"student.arch={arch!r} is not one of {', '.join(STUDENTS)}")
        self.dim, self.arch = STUDENTS[arch].dim, arch
        self.backbone = STUDENTS[arch].build()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, 3, H, W) -> (B, dim)
