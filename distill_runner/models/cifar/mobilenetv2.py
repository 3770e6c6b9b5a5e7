"""MobileNetV2 (Sandler et al. 2018) as in the CIFAR benchmarks (from Route Constrained Optimization):
a stride-2 stem, the seven inverted-residual stages, a 1x1 conv to 1280 channels and a linear head;
the zoo's MobileNetV2 is width 0.5, expansion 6.

Stage outputs for feature recipes: ``conv1`` (16 px at 32 px input), ``blocks.1`` (16 px), ``blocks.2``
(8 px), ``blocks.4`` (4 px), ``blocks.6`` (2 px): the reference's features f0..f4; ``conv2`` (2 px).

Docs: docs/guide/models.md
"""

from __future__ import annotations

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.cifar.common import check_inputs, init_conv_bn, named

# (expansion (None: the model's expand_ratio), channels, blocks, stride of the first block) per stage
STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip
STEM_CHANNELS = 32
LAST_CHANNELS = 1280  # scaled only for width multipliers above 1, as in the paper
CLASSIFIER_INIT_STD = 0.01


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear bottleneck), all in ``conv``;
    a residual sum where input and output shapes agree."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width_mult: float, expand_ratio: int, in_channels: int = 3):
        super().__init__()
        c_in = int(STEM_CHANNELS * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, c_in, 3, stride=2)
        self.blocks = nn.ModuleList()
        for expansion, channels, n, stride in STAGES:
            c_out = int(channels * width_mult)
            t = expand_ratio if expansion is None else expansion
            self.blocks.append(
                nn.Sequential(*(InvertedResidual(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, t)
                                for i in range(n)))
            )  # fmt: skip
            c_in = c_out
        last = int(LAST_CHANNELS * width_mult) if width_mult > 1.0 else LAST_CHANNELS
        self.conv2 = _conv_bn_relu(c_in, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_conv_bn(self, linear_std=CLASSIFIER_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(torch.flatten(self.avgpool(self.conv2(x)), 1))


def mobilenet_v2(
    num_classes: int,
    width_mult: float = 0.5,
    expand_ratio: int = 6,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "MobileNetV2",
) -> MobileNetV2:
    """``width_mult`` scales every stage's channels (0.5: the benchmarks' "mobile_half")."""
    if not width_mult > 0 or int(min(c for _, c, _, _ in STAGES) * width_mult) < 1:
        raise ConfigError("width_mult", width_mult, "use a positive multiplier that leaves every stage a channel")
    if not isinstance(expand_ratio, int) or expand_ratio < 1:
        raise ConfigError("expand_ratio", expand_ratio, "use a positive integer, e.g. 6 (the paper's)")
    check_inputs(architecture, in_channels, weights)
    return named(MobileNetV2(num_classes, width_mult, expand_ratio, in_channels), architecture)
