"""Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation basic blocks, depth 6n+4, widths
16, 16k, 32k, 64k; wrn_40_2 is depth 40, widen factor 2.

Stage outputs for feature recipes: ``conv1`` (stem), ``block1``, ``block2``, ``block3`` (32, 16, 8 px at
32 px input; pre-activation sums, as the reference's features) and ``relu`` (block3 after BN-ReLU).

Docs: docs/guide/models.md
"""

from __future__ import annotations

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.cifar.common import check_inputs, init_conv_bn, named


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3. Where the width changes, the shortcut is a 1x1 conv
    (``convShortcut``, the reference's name) of the activated input; otherwise the raw input."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.equal_in_out = c_in == c_out
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        out = self.dropout(self.relu2(self.bn2(self.conv1(activated))))
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    """One stage: ``layer`` holds its blocks (the reference's nesting, kept for its state_dict keys)."""

    def __init__(self, blocks: int, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(
            *(BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2, dropout)
        self.bn1, self.relu = nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn1(x))), 1))


def wide_resnet(
    num_classes: int,
    depth: int,
    widen_factor: int,
    dropout: float = 0.0,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "wide_resnet",
) -> WideResNet:
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ConfigError("depth", depth, "a Wide ResNet has 6n+4 layers: use 10, 16, 22, 28 or 40")
    if not isinstance(widen_factor, int) or widen_factor < 1:
        raise ConfigError("widen_factor", widen_factor, "use a positive integer, e.g. 1 or 2")
    if not 0 <= dropout < 1:
        raise ConfigError("dropout", dropout, "use a probability in [0, 1), e.g. 0.0 (the benchmarks' setting)")
    check_inputs(architecture, in_channels, weights)
    return named(WideResNet(depth, widen_factor, num_classes, in_channels, dropout), architecture)
