"""What the zoo's factories share: argument checks, weight initialisation, the label in reports.

Docs: docs/guide/models.md
"""

from __future__ import annotations

import math

from torch import nn

from distill_runner.errors import ConfigError


def check_inputs(name: str, in_channels: int, weights: str | None) -> None:
    """The zoo has no downloadable weights (its teachers come as checkpoints) and RGB stems."""
    if weights is not None:
        fix = f"the CIFAR zoo's {name} has no named weights; set weights=null and load a file with checkpoint=PATH"
        raise ConfigError("weights", weights, fix)
    if in_channels < 1:
        raise ConfigError("in_channels", in_channels, "must be at least 1 (3 for RGB images)")


def named(model: nn.Module, name: str) -> nn.Module:
    """The zoo name the model is reported under (``resnet8x4``), as ``architecture`` elsewhere."""
    model.architecture = name
    return model


def init_conv_bn(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """He-normal convolutions (std sqrt(2 / (k*k*out)), as the reference code), BatchNorm 1/0.

    ``linear_std``: normal(0, std) classifier weights with zero bias (VGG, MobileNetV2); None keeps
    PyTorch's default Linear init (``zero_linear_bias`` zeroes its bias, as the WRN reference does).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)
