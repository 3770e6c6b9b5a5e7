"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) as in the CIFAR benchmarks: a 1x1 stem of
24 channels without down-sampling, three stages that each halve the resolution, a linear head.
The zoo's ShuffleV1 has 3 groups and widths 240/480/960; its ShuffleV2 is the 1x net (116/232/464, 1024).

Stage outputs for feature recipes: ``relu`` (stem, 32 px at 32 px input), ``layer1``, ``layer2``,
``layer3`` (16, 8, 4 px), and for V2 ``conv2``/``bn2`` (the 1x1 conv to 1024 channels, 4 px).

Docs: docs/guide/models.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.cifar.common import check_inputs, named

STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> interleave the g groups' channels, so the next grouped conv mixes them."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, 3x3 depthwise conv (carries the stride), grouped 1x1 conv.
    Stride 2: the average-pooled input is concatenated (the unit adds ``c_out - c_in`` channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        mid = c_out // 4
        self.stride = stride
        self.first_groups = 1 if c_in == STEM_CHANNELS else groups  # the stem's 24 channels are not grouped
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu_out = nn.ReLU()  # the unit's last ReLU as a module: its input is the pre-ReLU tap (no keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(torch.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        return self.relu_out(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNetV1(nn.Module):
    def __init__(self, widths: Sequence[int], blocks: Sequence[int], groups: int, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(STEM_CHANNELS), nn.ReLU(inplace=True)
        c_in, stages = STEM_CHANNELS, []
        for width, n in zip(widths, blocks):
            units = [ShuffleV1Unit(c_in, width - c_in, 2, groups)]  # concatenation brings c_in channels
            units += [ShuffleV1Unit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _check_stages(widths: Sequence[int], blocks: Sequence[int], stages: int = 3) -> None:
    if len(widths) != stages or len(blocks) != stages or min(blocks) < 1:
        raise ConfigError("blocks", list(blocks), f"give {stages} widths and {stages} positive block counts")


def shufflenet_v1(
    num_classes: int,
    widths: Sequence[int] = (240, 480, 960),
    blocks: Sequence[int] = (4, 8, 4),
    groups: int = 3,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "ShuffleV1",
) -> ShuffleNetV1:
    _check_stages(widths, blocks)
    if any(w % (4 * groups) for w in widths):
        raise ConfigError("widths", list(widths), f"each must be a multiple of 4 x groups = {4 * groups}")
    check_inputs(architecture, in_channels, weights)
    return named(ShuffleNetV1(list(widths), list(blocks), groups, num_classes, in_channels), architecture)


class ShuffleV2Unit(nn.Module):
    """Half the channels pass; the other half go 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, x = x.chunk(2, dim=1)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return channel_shuffle(torch.cat([kept, torch.relu(self.bn3(self.conv3(out)))], 1), 2)


class ShuffleV2Down(nn.Module):
    """Both branches see the whole input and halve the resolution: left 3x3 depthwise-BN, 1x1-BN-ReLU;
    right 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; concatenate (c_out channels), shuffle."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2, self.bn2 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(torch.relu(self.bn3(self.conv3(x)))))
        right = torch.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(STEM_CHANNELS), nn.ReLU(inplace=True)
        c_in, stages = STEM_CHANNELS, []
        for width, n in zip(widths[:3], blocks):
            stages.append(nn.Sequential(ShuffleV2Down(c_in, width), *(ShuffleV2Unit(width) for _ in range(n))))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2, self.bn2 = nn.Conv2d(c_in, widths[3], 1, bias=False), nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def shufflenet_v2(
    num_classes: int,
    widths: Sequence[int] = (116, 232, 464, 1024),
    blocks: Sequence[int] = (3, 7, 3),
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    architecture: str = "ShuffleV2",
) -> ShuffleNetV2:
    """``widths``: the three stages' channels (even numbers) and the last 1x1 conv's; ``blocks``: units after
    each stage's down-sampling unit."""
    _check_stages(widths[:3], blocks)
    if len(widths) != 4 or any(w % 2 for w in widths[:3]):
        fix = "give three even stage widths and the last conv's, e.g. [116, 232, 464, 1024]"
        raise ConfigError("widths", list(widths), fix)
    check_inputs(architecture, in_channels, weights)
    return named(ShuffleNetV2(list(widths), list(blocks), num_classes, in_channels), architecture)
