"""Self-distillation: the student teaches auxiliary heads on its own shallow layers.

Docs: docs/methods/multi-teacher-self.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term
from distill_runner.distill.terms.logits import kd_per_sample
from distill_runner.errors import ConfigError
from distill_runner.models.features import check_layer, feature_shapes


class AuxHead(nn.Module):
    """1x1 conv + BN + ReLU bottleneck, global average pooling, linear classifier."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        z = self.bottleneck(x.float()).mean((2, 3))
        return z, self.fc(z)


class SelfDistillation(Term):
    """Self-distillation (Zhang et al., "Be Your Own Teacher", ICCV 2019), no separate teacher.

    Each named shallow student layer gets an auxiliary head (trained with the student, not
    shipped). Per head: ``(1 - alpha) * CE(head, y) + alpha * KD(head || final logits, T)`` with
    the final logits detached, plus ``hint_weight * MSE(head bottleneck, pooled deepest features)``
    when ``deepest`` names a student layer. Averaged over heads.
    """

    needs_teacher = False
    hyperparameters = ("temperature", "alpha")
    mixes_alpha = True

    def __init__(self, heads: Sequence[str], deepest: str | None = None, width: int = 64, hint_weight: float = 0.0):
        super().__init__()
        self._heads_cfg, self.deepest, self.width, self.hint_weight = heads, deepest, int(width), float(hint_weight)
        self.heads = nn.ModuleDict()
        self.names: list[str] = []

    def bind(self, student, teacher, data, key):
        if not self._heads_cfg:
            raise ConfigError(
                f"{key}.heads", self._heads_cfg, "name at least one shallow student layer, e.g. [features.0]"
            )
        self.names = list(self._heads_cfg)
        for i, name in enumerate(self.names):
            check_layer(student, name, f"{key}.heads.{i}", "student")
        if self.deepest is not None:
            check_layer(student, self.deepest, f"{key}.deepest", "student")
        layers = self.names + ([self.deepest] if self.deepest else [])
        shapes = feature_shapes(student, layers, data.in_channels, data.image_size)
        width = shapes[self.deepest][0] if self.deepest else self.width
        for i, name in enumerate(self.names):
            self.heads[str(i)] = AuxHead(shapes[name][0], width, data.num_classes)
        self.student_layers = tuple(layers)

    def forward(self, batch, student, teacher, state):
        alpha, temp = state.alpha, state.temperature
        final = student["logits"].detach()
        deep = student["features"][self.deepest].detach().float().mean((2, 3)) if self.deepest else None
        total = 0.0
        for i, name in enumerate(self.names):
            z, logits = self.heads[str(i)](student["features"][name])
            loss = (1 - alpha) * F.cross_entropy(logits, batch["target"]) + alpha * kd_per_sample(
                logits, final, temp
            ).mean()
            if deep is not None and self.hint_weight:
                loss = loss + self.hint_weight * F.mse_loss(z, deep)
            total = total + loss
        return total / len(self.names)
