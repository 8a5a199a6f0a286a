"""Models of the training tool: a small CNN (Fashion-MNIST), CIFAR ResNet-18, WideResNet.

``build_model(name, num_classes=10)`` is the one entry point (other tools import it):

* ``"cnn"``      small CNN for 1x28x28 inputs (Fashion-MNIST), BatchNorm, ~0.21 M parameters
* ``"resnet18"`` ResNet-18, CIFAR variant (3x3 stem, no max-pool), 3x32x32, ~11.2 M parameters
* ``"wrn16_4"``  WideResNet-16-4 (Zagoruyko & Komodakis 2016, pre-activation), 3x32x32, ~2.7 M
* ``"wrn28_10"`` WideResNet-28-10, 3x32x32, ~36.5 M; any ``"wrn<depth>_<widen>"`` with
  ``depth = 6n + 4`` works the same way (``WideResNet(depth, widen)``).

Every model has BatchNorm, so pass ``model=`` to the SAM-family optimizers.
"""
from __future__ import annotations

import re
from typing import List

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["build_model", "model_names", "SmallCNN", "ResNet18", "WideResNet"]


class SmallCNN(nn.Module):
    """Two conv blocks (3x3 conv + BN + ReLU + 2x2 max-pool; ``width`` and ``2 * width``
    channels) and a ``hidden``-unit BN + ReLU layer. Default width 16, hidden 128: about 0.21 M
    parameters, ~1.2 M multiply-adds per image, so that a comparison of five optimizers fits in
    minutes on two CPU cores."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                   # 28 -> 14
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                   # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, hidden, bias=False), nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, as in the SAM/ESAM/vSAM CIFAR code): 3x3 stem
    with stride 1 and no max-pool, four stages of two basic blocks (64, 128, 256, 512)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: List[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                layers.append(_BasicBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class _WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ 1x1 shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) for 32x32 inputs; ``depth = 6n + 4``."""

    def __init__(self, depth: int = 16, widen: int = 4, num_classes: int = 10, dropout: float = 0.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"WideResNet widen must be >= 1, got {widen}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        blocks: List[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


_WRN = re.compile(r"^wrn(\d+)_(\d+)$")

# name -> (input shape (C, H, W), dataset it is meant for)
_INPUTS = {"cnn": ((1, 28, 28), "fmnist"), "resnet18": ((3, 32, 32), "cifar10"),
           "wrn16_4": ((3, 32, 32), "cifar10"), "wrn28_10": ((3, 32, 32), "cifar10")}


def model_names() -> List[str]:
    """The named models (any ``wrn<depth>_<widen>`` is accepted too)."""
    return list(_INPUTS)


def input_shape(name: str):
    """(C, H, W) the model expects."""
    if name in _INPUTS:
        return _INPUTS[name][0]
    if _WRN.match(name):
        return (3, 32, 32)
    raise ValueError(f"unknown model {name!r}; known: {model_names()} or wrn<depth>_<widen>")


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh model by name: ``"cnn"`` (1x28x28), ``"resnet18"``, ``"wrn16_4"``, ``"wrn28_10"``
    (3x32x32; also any ``"wrn<depth>_<widen>"``). Initialised from torch's global RNG: seed it
    first (``torch.manual_seed``) for the same initial weights."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if name == "cnn":
        return SmallCNN(num_classes)
    if name == "resnet18":
        return ResNet18(num_classes)
    m = _WRN.match(name)
    if m:
        return WideResNet(int(m.group(1)), int(m.group(2)), num_classes)
    raise ValueError(f"unknown model {name!r}; known: {model_names()} or wrn<depth>_<widen>")
