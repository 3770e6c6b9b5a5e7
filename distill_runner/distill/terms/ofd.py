"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019), as the authors' code
(github:clovaai/overhaul-distillation, CIFAR-100/distiller.py).

Per stage pair: the student's pre-ReLU map through a connector (1x1 conv + BN) is pulled towards the
teacher's pre-ReLU map clamped from below by a margin, the expected value of the negative part of the
teacher's BatchNorm output per channel (``ofd_margin``); the partial L2 ignores positions where both the
student is below the (clamped) target and the target is negative (the ReLU would hide them). Stage ``i`` of
``n`` is weighted ``1 / 2^(n-1-i)``; the sum is divided by the batch size (the official loop's further
``/ 1000`` is the recipe's weight). The teacher side is ``max(feature, margin)`` (``teacher_summary``): a
function of the frozen teacher alone, replayed like any feature.

Docs: docs/methods/feature-maps.md
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distill_runner.distill.contract import Term
from distill_runner.distill.terms.features import parse_pairs
from distill_runner.models.features import feature_shapes, resize_to
from distill_runner.models.stages import Stage, pre_relu, stage_named, stages

MARGIN_CDF_MIN = 0.001  # below this probability of a negative response the official code uses -3 sigma


def ofd_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per channel, E[x | x < 0] for x ~ N(bias, weight^2) (a BatchNorm's output), or ``-3|weight|`` where
    P(x < 0) <= 0.001: the official ``get_margin_from_BN``. Float64 inside, float32 out."""
    s, m = weight.detach().double().abs(), bias.detach().double()
    cdf = torch.special.ndtr(-m / s)
    expected = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return torch.where(cdf > MARGIN_CDF_MIN, expected, -3 * s).float()


def ofd_partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """The official ``distillation_loss``: summed squared error where ``source > target`` or ``target > 0``,
    ``target`` clamped from below by ``margin`` ([C], broadcast over channels; None: clamped already)."""
    if margin is not None:
        target = torch.max(target, margin.view(1, -1, 1, 1).to(target))
    mask = (source > target) | (target > 0)
    return ((source - target).pow(2) * mask).sum()


def ofd_loss(sources, targets, margins=None) -> torch.Tensor:
    """``sum_i partial_l2(source_i, target_i, margin_i) / 2^(n-1-i) / batch``: the official Distiller's
    ``loss_distill`` over the batch size (the training loop divides it by 1000 more: the recipe's weight)."""
    n, margins = len(sources), margins if margins is not None else [None] * len(sources)
    total = sum(
        ofd_partial_l2(s, t, m) / 2 ** (n - 1 - i) for i, (s, t, m) in enumerate(zip(sources, targets, margins))
    )
    return total / sources[0].shape[0]


def stage_pairs(student, teacher, pairs, key: str, need_pre_relu: bool, need_bn: bool = False):
    """``pairs: stages`` (the last ``min(n_student, n_teacher)`` stages of each, first to last) or a list of
    ``{student: <stage output>, teacher: <stage output>}``: ``[(student Stage, teacher Stage)]``, each
    checked (a wrong name, a stage without pre-ReLU output or BatchNorm: one line)."""
    if pairs in ("stages", "auto"):
        s, t = stages(student), stages(teacher)
        n = min(len(s), len(t))
        chosen = [(f"{key}.pairs", f"{key}.pairs", a, b) for a, b in zip(s[len(s) - n :], t[len(t) - n :])]
    else:
        chosen = []
        for i, (s, t, _) in enumerate(parse_pairs(pairs, f"{key}.pairs")):
            s_key, t_key = f"{key}.pairs.{i}.student", f"{key}.pairs.{i}.teacher"
            chosen.append(
                (s_key, t_key, stage_named(student, s, s_key, "student"), stage_named(teacher, t, t_key, "teacher"))
            )
    if need_pre_relu:
        for s_key, t_key, s, t in chosen:
            pre_relu(student, s, s_key, "student")
            pre_relu(teacher, t, t_key, "teacher", need_bn)
    return [(s, t) for _, _, s, t in chosen]


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """The official ``build_feature_connector``: 1x1 conv (He normal, fan out) + BN (1, 0)."""
    conv, bn = nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class OFD(Term):
    """OFD's distillation loss over stage pairs (``pairs: stages``, or named stage outputs; the pre-ReLU
    maps are read). Where spatial sizes differ the student map is resized to the teacher's (bilinear; the
    official pairs always agree). The teacher must have a BatchNorm before each paired ReLU."""

    def __init__(self, pairs="stages"):
        super().__init__()
        self._pairs_cfg = pairs
        self.connectors = nn.ModuleList()
        self._teacher_bns: list[nn.Module] = []  # the teacher's own modules, not this term's: a plain list

    def bind(self, student, teacher, data, key):
        chosen: list[tuple[Stage, Stage]] = stage_pairs(student, teacher, self._pairs_cfg, key, True, need_bn=True)
        self.student_layers = tuple(s.pre_relu for s, _ in chosen)
        self.teacher_layers = tuple(t.pre_relu for _, t in chosen)
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        self.connectors = nn.ModuleList(connector(s_shapes[s][0], t_shapes[t][0]) for s, t in self.layer_pairs())
        modules = dict(teacher.named_modules())
        self._teacher_bns = [modules[t.bn] for _, t in chosen]

    def layer_pairs(self):
        return list(zip(self.student_layers, self.teacher_layers))

    def margins(self) -> list[torch.Tensor]:
        """Per pair, the margins of the teacher's BatchNorm as it is now (the teacher is frozen while the
        student trains; computed from its trained weights, not the architecture bound)."""
        return [ofd_margin(bn.weight, bn.bias) for bn in self._teacher_bns]

    def teacher_summary(self, layer, feature):
        """``max(feature, margin)``: all of the teacher the loss reads."""
        margin = self.margins()[self.teacher_layers.index(layer)]
        return torch.max(feature.float(), margin.view(1, -1, 1, 1).to(feature.device))

    def forward(self, batch, student, teacher, state):
        sources, targets = [], []
        for (s, t), conn in zip(self.layer_pairs(), self.connectors):
            y = teacher["features"][t].float()
            sources.append(resize_to(conn(student["features"][s].float()), y))
            targets.append(y)
        return ofd_loss(sources, targets)


__all__ = ["OFD", "ofd_loss", "ofd_margin", "ofd_partial_l2", "stage_pairs"]
