"""Stage outputs of every shipped model, for multi-level feature methods (OFD, AB, FT, ReviewKD, hints).

A :class:`Stage` names, by module path, the output of one of a model's stages (its resolution levels, the
stem left out), the tap of its pre-ReLU output (the input of the stage's last ReLU, ``PATH:input``, or the
stage output itself where the stage ends linearly), and the BatchNorm that produces that pre-ReLU output
(OFD's margins; ``None`` where no single BatchNorm does). Nothing here changes a model's state_dict: the
ReLUs tapped are parameter-free modules. ``docs/reference/layers.md`` lists them per model
(``scripts/layer_table.py`` writes it). The pre-ReLU outputs and BatchNorms follow the official codes'
``preact`` features and ``get_bn_before_relu`` (RepDistiller, overhaul-distillation).

Docs: docs/reference/layers.md
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torchvision
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.features import INPUT


@dataclass(frozen=True)
class Stage:
    output: str  # module path of the stage's output
    pre_relu: str | None  # tap of its pre-ReLU output (None: the stage has none)
    bn: str | None  # the BatchNorm whose output is that pre-ReLU output (None: none single)


def _last(model: nn.Module, path: str) -> str:
    """The path of the last child of the container at ``path``: ``layer3`` -> ``layer3.2``."""
    return f"{path}.{len(model.get_submodule(path)) - 1}"


def _cifar_stages(model: nn.Module) -> list[Stage] | None:
    from distill_runner.models.cifar import mobilenetv2, resnet, shufflenet, vgg, wrn

    if isinstance(model, (resnet.CifarResNet, resnet.ResNet50)):
        names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
        bn = "bn3" if isinstance(model, resnet.ResNet50) else "bn2"
        return [Stage(n, f"{_last(model, n)}.relu_out{INPUT}", f"{_last(model, n)}.{bn}") for n in names]
    if isinstance(model, wrn.WideResNet):  # pre-ReLU: the next block's first BN (RepDistiller's preact)
        pre = [("block2.layer.0.relu1", "block2.layer.0.bn1"), ("block3.layer.0.relu1", "block3.layer.0.bn1")]
        pre.append(("relu", "bn1"))
        return [Stage(f"block{i + 1}", f"{r}{INPUT}", bn) for i, (r, bn) in enumerate(pre)]
    if isinstance(model, vgg.VGG):  # the blocks end with their BN; relu<i> follows
        return [Stage(f"relu{i}", f"block{i}", _last(model, f"block{i}")) for i in range(1, 5)]
    if isinstance(model, mobilenetv2.MobileNetV2):  # linear bottlenecks: the stage output is pre-ReLU
        return [Stage(f"blocks.{i}", f"blocks.{i}", f"{_last(model, f'blocks.{i}')}.conv.7") for i in (1, 2, 4, 6)]
    if isinstance(model, shufflenet.ShuffleNetV1):  # a concatenation or sum before the ReLU: no single BN
        return [Stage(n, f"{_last(model, n)}.relu_out{INPUT}", None) for n in ("layer1", "layer2", "layer3")]
    if isinstance(model, shufflenet.ShuffleNetV2):  # half the channels pass each unit: no pre-ReLU map
        return [Stage(n, None, None) for n in ("layer1", "layer2", "layer3")]
    return None


def _tiny_cnn_stages(model: nn.Module) -> list[Stage]:
    """Each block is conv-BN-ReLU-pool: the output is pooled, the pre-ReLU map (full size) is the BN's."""
    return [Stage(f"features.{i}", f"features.{i}.2{INPUT}", f"features.{i}.1") for i in range(len(model.features))]


def _resnet_like(model: nn.Module, names: list[str]) -> list[Stage]:
    """torchvision's and timm's ResNets: the last block's last activation (``relu`` called twice or three
    times: the tap keeps the last call; timm: ``act2``/``act3``) and its last BN of the residual branch."""
    stages = []
    for name in names:
        block_path = _last(model, name)
        block = model.get_submodule(block_path)
        bn = "bn3" if hasattr(block, "bn3") else "bn2"
        act = "relu" if hasattr(block, "relu") else ("act3" if hasattr(block, "act3") else "act2")
        stages.append(Stage(name, f"{block_path}.{act}{INPUT}", f"{block_path}.{bn}"))
    return stages


def _mobilenet_stages(model: nn.Module) -> list[Stage]:
    """torchvision MobileNetV2/V3: the last inverted-residual block before each down-sampling one (and the
    last); they end linearly (conv-BN), so the block output is pre-ReLU, its last BN the margin's."""
    blocks = [i for i, m in enumerate(model.features) if type(m).__name__ == "InvertedResidual"]
    ends = [i for i, j in pairwise(blocks) if _downsamples(model.features[j])] + blocks[-1:]
    stages = []
    for i in ends:
        bns = [n for n, m in model.features[i].named_modules() if isinstance(m, nn.BatchNorm2d)]
        stages.append(Stage(f"features.{i}", f"features.{i}", f"features.{i}.{bns[-1]}"))
    return stages


def _downsamples(block: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in block.modules())


def stages(model: nn.Module) -> list[Stage]:
    """The model's stages, first to last; a model of no known family is one line naming the fix."""
    from distill_runner.models.factories import TinyCNN

    found = _cifar_stages(model)
    if found is not None:
        return found
    if isinstance(model, TinyCNN):
        return _tiny_cnn_stages(model)
    if isinstance(model, torchvision.models.ResNet):
        return _resnet_like(model, ["layer1", "layer2", "layer3", "layer4"])
    if isinstance(model, (torchvision.models.MobileNetV2, torchvision.models.MobileNetV3)):
        return _mobilenet_stages(model)
    info = getattr(model, "feature_info", None)  # timm: its own list of feature stages
    if info is not None and not callable(info):
        names = [f["module"] for f in info if f.get("reduction", 2) > 2]  # the stem (reduction 2) left out
        if all(hasattr(model, n) and hasattr(model.get_submodule(_last(model, n)), "bn2") for n in names):
            return _resnet_like(model, names)
        return [Stage(n, None, None) for n in names]
    fix = "name module paths instead (layers: [...]); stage tables exist for the CIFAR zoo, torchvision ResNets and"
    raise ConfigError("layers", "stages", f"{fix} MobileNets, timm models and the tiny CNN, not {type(model).__name__}")


def stage_layers(model: nn.Module) -> list[str]:
    """Module paths of the stage outputs, first to last."""
    return [s.output for s in stages(model)]


def stage_named(model: nn.Module, name: str, key: str, role: str) -> Stage:
    """The stage whose output is ``name``; any other name is one line listing the stage outputs."""
    found = {s.output: s for s in stages(model)}
    if name not in found:
        valid = ", ".join(found)
        raise ConfigError(key, name, f"not a stage output of the {role} ({type(model).__name__}); stages: {valid}")
    return found[name]


def pre_relu(model: nn.Module, stage: Stage, key: str, role: str, need_bn: bool = False) -> Stage:
    """``stage``, checked to have a pre-ReLU tap (and its BatchNorm where ``need_bn``); else one line."""
    arch = type(model).__name__
    if stage.pre_relu is None:
        raise ConfigError(key, stage.output, f"the {role} ({arch}) has no pre-ReLU output at this stage")
    if need_bn and stage.bn is None:
        fix = f"no BatchNorm before the ReLU at this stage of the {role} ({arch}): OFD's margins need one"
        raise ConfigError(key, stage.output, f"{fix}; use another teacher (a ResNet, WRN, VGG or MobileNetV2)")
    return stage
