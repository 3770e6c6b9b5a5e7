"""Intermediate features by module path (``layer3``, ``features.1``), captured with forward hooks.

``<path>:input`` taps a module's input instead (its last call's): the input of a stage's last ReLU is the
stage's pre-ReLU output (``layer3.2.relu_out:input``; :mod:`distill_runner.models.stages` names them).

A :class:`FeatureTap` runs the model and returns ``{"logits": ..., "features": {path: tensor}}``;
hooks record only inside its own call, so evaluation passes are untouched. Names are checked
up front: a wrong one is a :class:`ConfigError` listing the valid names.

Docs: docs/guide/models.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.errors import ConfigError


def layer_names(model: nn.Module, max_depth: int = 2) -> list[str]:
    """Module paths a config can name (up to ``max_depth`` dots deep, for the error message)."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < max_depth]


INPUT = ":input"  # the tap spelling of a module's input


def module_path(tap: str) -> str:
    """The module a tap name hooks: ``layer3.2.relu_out:input`` -> ``layer3.2.relu_out``."""
    return tap[: -len(INPUT)] if isinstance(tap, str) and tap.endswith(INPUT) else tap


def check_layer(model: nn.Module, name: str, key: str, role: str) -> None:
    modules = dict(model.named_modules())
    if not isinstance(name, str) or module_path(name) not in modules or module_path(name) == "":
        valid = ", ".join(layer_names(model))
        raise ConfigError(
            key,
            name,
            f"no such layer in the {role} ({type(model).__name__}); valid names: {valid} (or deeper module paths, "
            f"a module's input as PATH{INPUT}, or layers: stages)",
        )


class FeatureTap:
    """Call the model and collect the outputs of the named modules."""

    def __init__(self, model: nn.Module, layers: Sequence[str] = (), call: nn.Module | None = None):
        """``call``: what to run instead of ``model`` itself, e.g. it wrapped in DDP or compiled."""
        self.model, self.layers = (call if call is not None else model), tuple(dict.fromkeys(layers))
        self._store: dict[str, torch.Tensor] | None = None
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.layers:
            if name.endswith(INPUT):
                self._handles.append(modules[module_path(name)].register_forward_pre_hook(self._input_hook(name)))
            else:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._store is not None:
                self._store[name] = output

        return hook

    def _input_hook(self, name: str):
        def hook(module, inputs):
            if self._store is not None:
                self._store[name] = inputs[0]  # a module called twice (torchvision's relu): the last call's
                if getattr(module, "inplace", False):  # an in-place ReLU would overwrite the tapped tensor
                    return (inputs[0].clone(), *inputs[1:])
            return None

        return hook

    def __call__(self, images: torch.Tensor) -> dict:
        if not self.layers:
            return {"logits": self.model(images)}
        self._store = {}
        try:
            logits = self.model(images)
            return {"logits": logits, "features": self._store}
        finally:
            self._store = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def feature_shapes(model: nn.Module, layers: Sequence[str], in_channels: int, image_size: int) -> dict[str, torch.Size]:
    """Shapes [C, H, W] of the named features for one image (a dry run in eval mode)."""
    was_training = model.training
    model.eval()
    tap = FeatureTap(model, layers)
    try:
        device = next(model.parameters()).device
        out = tap(torch.zeros(2, in_channels, image_size, image_size, device=device))
    finally:
        tap.remove()
        model.train(was_training)
    return {name: out["features"][name].shape[1:] for name in layers}


class Adapter(nn.Sequential):
    """FitNets regressor: 1x1 conv + BatchNorm from student to teacher channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize a feature map [B,C,H,W] to ``like``'s spatial size (no-op when equal)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
