"""Student registry: torchvision backbones with the classifier removed, plus small CNNs for the demo.

A student maps images (B, 3, H, W) to its pooled feature (B, dim). Its `backbone` keeps torchvision's
own module names, so `backbone.state_dict()` loads into `torchvision.models.<arch>()` with only the
classifier's keys missing (see fastreg.export).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

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


def strip_classifier(model: nn.Module, attr: str) -> nn.Module:
    setattr(model, attr, nn.Identity())  # forward() now ends at the pooled, flattened feature
    return model


# name -> (builder of a classifier-free backbone, pooled feature width)
STUDENTS: Dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: strip_classifier(tvm.resnet18(), "fc"), 512),
    "resnet34": (lambda: strip_classifier(tvm.resnet34(), "fc"), 512),
    "resnet50": (lambda: strip_classifier(tvm.resnet50(), "fc"), 2048),
    "mobilenet_v2": (lambda: strip_classifier(tvm.mobilenet_v2(), "classifier"), 1280),
    "mobilenet_v3_large": (lambda: strip_classifier(tvm.mobilenet_v3_large(), "classifier"), 960),
    "efficientnet_b0": (lambda: strip_classifier(tvm.efficientnet_b0(), "classifier"), 1280),
    "cnn_tiny": (lambda: SmallCNN((16, 32, 64)), 64),
    "cnn_small": (lambda: SmallCNN((32, 64, 128)), 128),
}


class Student(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        if arch not in STUDENTS:
            raise ValueError(f"student.arch={arch!r} is not one of {', '.join(STUDENTS)}")
        build, self.dim = STUDENTS[arch]
        self.arch = arch
        self.backbone = build()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, 3, H, W) -> (B, dim)
