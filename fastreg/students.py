"""Student registry: the papers' torchvision backbones without their final classifier Linear, plus small CNNs
for the demo.

A student maps images (B, 3, H, W) to its feature (B, dim): the input of the final Linear of the network the
paper trained, so SEED's MobileNet-v3-L and EfficientNet-B0 keep their last Linear/h-swish and Dropout(0.2).
Its `backbone` keeps torchvision's own module names, so `backbone.state_dict()` loads into
`torchvision.models.<arch>()` with only that Linear's keys missing (see fastreg.export).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

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
    build: Callable[[], nn.Module]  # the backbone, with torchvision's module names: (B, 3, H, W) -> (B, dim)
    dim: int  # width of its feature: what the heads, the k-NN and the linear probe see
    # torchvision's name of the classifier Linear the student drops: an exported student lacks its keys, and only
    # those (fastreg.export.check_keys). None: not a torchvision model.
    final_linear: str | None


STUDENTS: dict[str, StudentArch] = {
    "resnet18": StudentArch(lambda: drop_module(tvm.resnet18(), "fc"), 512, "fc"),
    "resnet34": StudentArch(lambda: drop_module(tvm.resnet34(), "fc"), 512, "fc"),
    "resnet50": StudentArch(lambda: drop_module(tvm.resnet50(), "fc"), 2048, "fc"),
    # SimReg's MobileNet-v2 (UCDvision/simreg models/mobilenet.py, MobileNetV2._forward_impl) pools into its fc with
    # no dropout: drop torchvision's whole classifier, Dropout(0.2) + Linear
    "mobilenet_v2": StudentArch(lambda: drop_module(tvm.mobilenet_v2(), "classifier"), 1280, "classifier.1"),
    # SEED's MobileNet-v3-L (seed/architectures/mobilenet/mobilenetv3.py, MobileNetV3.__init__) ends with
    # classifier = Linear(960, 1280), h_swish, Dropout(0.2) before its fc: its feature is 1280-d. torchvision's
    # classifier[0:3] is the same Linear + Hardswish + Dropout(0.2); only classifier[3], the 1000-way Linear, goes
    "mobilenet_v3_large": StudentArch(
        lambda: drop_module(tvm.mobilenet_v3_large(), "classifier.3"), 1280, "classifier.3"
    ),
    # SEED's EfficientNet-B0 (seed/architectures/efficientnet/model.py, EfficientNet.forward) applies Dropout(0.2)
    # to the pooled feature before its fc: keep torchvision's classifier[0] (Dropout), drop classifier[1]
    "efficientnet_b0": StudentArch(lambda: drop_module(tvm.efficientnet_b0(), "classifier.1"), 1280, "classifier.1"),
    "cnn_tiny": StudentArch(lambda: SmallCNN((16, 32, 64)), 64, None),
    "cnn_small": StudentArch(lambda: SmallCNN((32, 64, 128)), 128, None),
}


class Student(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        if arch not in STUDENTS:
            raise ValueError(f"student.arch={arch!r} is not one of {', '.join(STUDENTS)}")
        build, self.dim, _ = STUDENTS[arch]
        self.arch = arch
        self.backbone = build()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, 3, H, W) -> (B, dim)
