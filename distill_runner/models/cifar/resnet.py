"""CIFAR ResNets (He et al. 2016, section 4.2: three stages of 2n basic blocks, 6n+2 layers) and the
ResNet50 of the CIFAR benchmarks (four bottleneck stages with a 3x3 stride-1 stem).

Stage outputs for feature recipes: ``relu`` (stem), ``layer1``, ``layer2``, ``layer3`` (after the
block's ReLU; 32, 16, 8 px at 32 px input), and ``layer4`` for ResNet50 (4 px). Each block's last ReLU is
the module ``relu_out`` (no state_dict keys): its input is the stage's pre-ReLU output
(``layer3.2.relu_out:input``, see :mod:`distill_runner.models.stages`).

Docs: docs/guide/models.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.cifar.common import check_inputs, init_conv_bn, named


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """1x1 conv + BN on the shortcut where the block changes width or resolution."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (``downsample`` where shapes change), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.downsample = _projection(c_in, c_out, stride) if stride != 1 or c_in != c_out else None
        self.relu_out = nn.ReLU()  # the block's last ReLU as a module: its input is the pre-ReLU tap (no keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu_out(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in, stages = widths[0], []
        for i, width in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(c_in if j == 0 else width, width, stride if j == 0 else 1)
                                          for j in range(blocks))))  # fmt: skip
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(8) on the 8x8 map of a 32 px image
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    num_classes: int,
    depth: int,
    widths: Sequence[int],
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "cifar_resnet",
) -> CifarResNet:
    """A CIFAR ResNet: ``depth`` = 6n+2 (n basic blocks per stage), ``widths`` = [stem, layer1, layer2, layer3]
    (resnet8x4 and resnet32x4 are resnet8 and resnet32 with four times the widths)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError("depth", depth, "a CIFAR ResNet has 6n+2 layers: use 8, 14, 20, 32, 44, 56 or 110")
    if len(widths) != 4 or min(widths) < 1:
        raise ConfigError("widths", list(widths), "give four positive widths [stem, layer1, layer2, layer3]")
    check_inputs(architecture, in_channels, weights)
    return named(CifarResNet(depth, tuple(widths), num_classes, in_channels), architecture)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand x4, each with BN; ``shortcut`` is empty or 1x1 conv + BN."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = _projection(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Sequential()
        self.relu_out = nn.ReLU()  # the block's last ReLU as a module: its input is the pre-ReLU tap (no keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return self.relu_out(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 for 32 px images: 3x3 stride-1 stem without max-pool, stages of 3, 4, 6, 3 bottlenecks."""

    def __init__(self, num_classes: int, in_channels: int = 3, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        c_in, stages = 64, []
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(Bottleneck(c_in if j == 0 else width * 4, width, stride if j == 0 else 1)
                                          for j in range(n))))  # fmt: skip
            c_in = width * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def resnet50(
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "ResNet50",
) -> ResNet50:
    check_inputs(architecture, in_channels, weights)
    return named(ResNet50(num_classes, in_channels), architecture)
