"""Teachers and students.

Every model factory takes ``num_classes``, ``in_channels`` and ``image_size`` (the runner passes
them from the data set) plus its own config keys, so any factory can serve as teacher or student.

Docs: docs/reference/api.md
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)

# Below this input size the ImageNet stem (stride-2 7x7 conv + max-pool) throws away most of the
# image, so torchvision models get the small-image stem used for CIFAR.
SMALL_INPUT_MAX = 64

# PyTorch's default BatchNorm momentum: running statistics follow the data within a few dozen steps.
DEFAULT_BN_MOMENTUM = 0.1

# Architectures with auxiliary classifiers: in train mode they return a tuple of logits, which no
# recipe reads, so they are built without them (and with their own weight init, which they warn about).
AUX_ARCHS = ("googlenet", "inception_v3")
# Inception v3 has unpadded stride-2 stages: below this size its feature map vanishes.
MIN_IMAGE_SIZE = {"inception_v3": 75}


def architecture(model: nn.Module) -> str:
    """The label a model is reported under: the torchvision arch, ``tiny_cnn[16,32]``, or its class."""
    return getattr(model, "architecture", None) or type(model).__name__


class TinyCNN(nn.Module):
    """A tiny CNN in the spirit of the classic KD examples: conv blocks, pooling, a linear head.

    The adaptive pooling makes the parameter count independent of the image size, so the same
    ~100k-parameter student works at 32 px and at 224 px.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32),
        pool_size: int = 4,
        hidden: int = 192,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.architecture = f"tiny_cnn[{','.join(map(str, channels))}]"  # the channels tell tiny CNNs apart
        blocks, c_in = [], in_channels
        for c_out in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def tiny_cnn(
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    channels: Sequence[int] = (16, 32),
    pool_size: int = 4,
    hidden: int = 192,
    dropout: float = 0.0,
) -> TinyCNN:
    if weights is not None:
        raise ConfigError("weights", weights, "the tiny CNN has no pretrained weights; set weights=null")
    return TinyCNN(num_classes, in_channels, list(channels), pool_size, hidden, dropout)


def torchvision_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    small_input: bool | str = "auto",
    bn_momentum: float | None = DEFAULT_BN_MOMENTUM,
    **kwargs,
) -> nn.Module:
    """A torchvision classifier (resnet18, mobilenet_v2, mobilenet_v3_small, ...) for this data set.

    ``weights`` is a torchvision weights name such as ``IMAGENET1K_V1``; the pretrained head is
    replaced by one for ``num_classes``. ``small_input`` (auto: image_size <= 64) swaps the
    ImageNet stem for the small-image one: stride-1 first conv, no max-pool (3x3 conv for ResNets).

    ``bn_momentum`` (default 0.1, PyTorch's default) is set on every BatchNorm layer; null keeps the
    architecture's own. Some architectures are built for ImageNet-length schedules with a much
    slower one (MobileNetV3: 0.01, MNASNet: 0.0003): after the few hundred steps of a run here
    their running statistics are still near their initial values (variance 1 where the data's is
    often 100x smaller), so the model is right in train mode and at chance in eval mode.
    ResNets, MobileNetV2 and EfficientNets already use 0.1.
    """
    if bn_momentum is not None and not 0 < bn_momentum <= 1:
        raise ConfigError(
            "bn_momentum", bn_momentum, "must be in (0, 1], e.g. 0.1 (PyTorch's default); null keeps the architecture's"
        )
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            "arch", arch, "use a torchvision classification model, e.g. resnet18, mobilenet_v2, mobilenet_v3_small"
        )
    shape_kwargs = _shape_kwargs(arch, image_size, kwargs)
    if weights is not None:
        aux = {"aux_logits": True} if arch in AUX_ARCHS else {}  # the pretrained files hold the aux heads
        model = torchvision.models.get_model(arch, weights=None, **{**kwargs, **shape_kwargs, **aux})
        model.load_state_dict(_fit_state_dict(arch, _pretrained_state_dict(arch, weights), image_size))
        if arch in AUX_ARCHS and not kwargs.get("aux_logits"):
            _drop_aux_heads(model)
        _replace_head(model, num_classes)
    else:
        model = torchvision.models.get_model(arch, num_classes=num_classes, **kwargs, **shape_kwargs)
    if small_input == "auto":
        # a ViT's first conv cuts the image into patches: a stride-1 "small stem" would break that
        small_input = image_size <= SMALL_INPUT_MAX and not arch.startswith("vit_")
    if small_input:
        _use_small_stem(model)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    problem = dry_run(model, in_channels, image_size)
    if problem is not None:
        fix = f"does not run on {image_size} px images ({problem}); use a larger dataset.image_size or another arch"
        raise ConfigError("arch", arch, fix)
    model.architecture = arch  # reported as such, whatever the config calls it
    return model


@torch.no_grad()
def dry_run(model: nn.Module, in_channels: int, image_size: int) -> str | None:
    """None when the model takes a batch of ``image_size`` images, else what went wrong: a model too deep
    for small images fails here with one line, not in the middle of a run. Eval mode: no BatchNorm
    statistics change."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    finally:
        model.train(was_training)
    return None


def _shape_kwargs(arch: str, image_size: int, kwargs: dict) -> dict:
    """Constructor arguments some architectures need for this data set, or a one-line error."""
    if image_size < MIN_IMAGE_SIZE.get(arch, 0):
        size = MIN_IMAGE_SIZE[arch]
        raise ConfigError("arch", arch, f"needs images of at least {size} px; use dataset.image_size={size} or more")
    if arch in AUX_ARCHS:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    if arch.startswith("vit_"):  # a ViT is built for one image size (its position embeddings)
        patch = int(arch.rsplit("_", 1)[1])
        if image_size % patch:
            size = max(patch, round(image_size / patch) * patch)
            fix = f"cuts images into {patch} px patches: use a dataset.image_size that is a multiple, e.g. {size}"
            raise ConfigError("arch", arch, fix)
        return {"image_size": image_size}
    return {}


def _fit_state_dict(arch: str, state: dict, image_size: int) -> dict:
    """Pretrained ViT position embeddings are for 224 px: interpolated to this image size."""
    if not arch.startswith("vit_"):
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return interpolate_embeddings(image_size, int(arch.rsplit("_", 1)[1]), state)


def _drop_aux_heads(model: nn.Module) -> None:
    """What torchvision does for ``aux_logits=False`` with pretrained weights."""
    model.aux_logits = False
    for name in ("AuxLogits", "aux1", "aux2"):
        if hasattr(model, name):
            setattr(model, name, None)


def _pretrained_state_dict(arch: str, weights: str) -> dict:
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except KeyError:
        names = [w.name for w in torchvision.models.get_model_weights(arch)]
        raise ConfigError("weights", weights, f"{arch} has weights {names}, or set weights=null") from None
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as exc:
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        raise ConfigError(
            "weights",
            weights,
            f"downloading {enum.url} failed ({type(exc).__name__}: {exc}); put that file at {target} "
            f"(or set TORCH_HOME), or set weights=null to train from scratch",
        ) from None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer (fc for ResNets, classifier[-1] for MobileNets) for a new one."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    _set_submodule(model, name, nn.Linear(last.in_features, num_classes))


def _use_small_stem(model: nn.Module) -> None:
    if isinstance(model, torchvision.models.ResNet):
        out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, out, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        _, conv = _first_conv(model)
        conv.stride = (1, 1)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = _first_conv(model)
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():  # keep pretrained filters: average them over the input channels
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
    _set_submodule(model, name, new)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
