"""VGG with BatchNorm for CIFAR (the benchmarks' variant): five conv stages, max-pooling between
them, global average pooling and a single linear classifier (no VGG fully connected layers).

Stage outputs for feature recipes: ``relu0`` ... ``relu4`` (each stage after its ReLU; 32, 16, 8, 4, 4 px
at 32 px input) or ``block1`` ... ``block4`` (the same before the ReLU: the reference's pre-activation).

Docs: docs/guide/models.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.cifar.common import check_inputs, init_conv_bn, named

# The reference pools after block3 only for 64 px inputs: at 32 px block3 and block4 both see 4x4 maps.
POOL3_INPUT_SIZE = 64
CLASSIFIER_INIT_STD = 0.01  # the reference's normal init of the classifier


def _stage(widths: Sequence[int], c_in: int) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU per width, without the last ReLU (the forward pass applies it: stage
    outputs exist before and after it). The indices (conv at 3i, BN at 3i+1) are the reference's keys."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c_in = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        c_in = in_channels
        for i, widths in enumerate(stages):
            setattr(self, f"block{i}", _stage(widths, c_in))
            setattr(self, f"relu{i}", nn.ReLU())
            c_in = widths[-1]
        for i in range(len(stages) - 1):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        init_conv_bn(self, linear_std=CLASSIFIER_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_size = x.shape[-2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if input_size == POOL3_INPUT_SIZE:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def vgg_bn(
    num_classes: int,
    stages: Sequence[Sequence[int]],
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "vgg_bn",
) -> VGG:
    """``stages``: five lists of conv widths, e.g. vgg8 = [[64], [128], [256], [512], [512]]."""
    if len(stages) != 5 or any(len(s) < 1 for s in stages):
        raise ConfigError("stages", [list(s) for s in stages], "give five non-empty lists of conv widths")
    check_inputs(architecture, in_channels, weights)
    return named(VGG([list(s) for s in stages], num_classes, in_channels), architecture)
