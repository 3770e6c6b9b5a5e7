"""Variational information distillation (Ahn, Hu, Damianou, Lawrence, Dai; CVPR 2019), as RepDistiller's
``VIDLoss`` (the authors' code, github.com/ssahn0215/variational-information-distillation).

Per layer pair, a regressor (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv; middle width = the teacher's channels, as
``train_student.py`` builds it) predicts the teacher's map from the student's, under a Gaussian with a learned
per-channel variance ``softplus(log_scale) + eps``; the loss is its negative log-likelihood (up to a constant)::

    vid_i = mean(0.5 * ((mu_i(s_i) - t_i)^2 / var_i + log(var_i))),    loss = sum_i w_i * vid_i

The larger map is average-pooled to the smaller one's size first. The regressors and variances train with the
student; the teacher's maps are replayed as they are.

Docs: docs/methods/crd-vid-reviewkd.md
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.terms.features import LayerPairs
from distill_runner.errors import ConfigError
from distill_runner.models.features import feature_shapes


def match_sizes(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official pooling: the map with the larger height average-pooled to the other's (square) size."""
    if x.shape[2] > y.shape[2]:
        x = F.adaptive_avg_pool2d(x, (y.shape[2], y.shape[2]))
    elif x.shape[2] < y.shape[2]:
        y = F.adaptive_avg_pool2d(y, (x.shape[2], x.shape[2]))
    return x, y


def vid_nll(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5):
    """``mean(0.5 * ((pred_mean - target)^2 / var + log var))``, ``var = log(1 + exp(log_scale)) + eps`` per channel."""
    pred_var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var)))


class VIDRegressor(nn.Module):
    """One pair's regressor and learned variance, initialized as the official ``VIDLoss``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_pred_var: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        self.log_scale = nn.Parameter(math.log(math.exp(init_pred_var - eps) - 1.0) * torch.ones(out_channels))
        self.eps = eps

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        x, y = match_sizes(student_feature, teacher_feature)
        return vid_nll(self.regressor(x), y, self.log_scale, self.eps)


class VID(LayerPairs):
    """VID over layer pairs ``[{student: features.0, teacher: layer2, weight: 1.0}, ...]`` (4-D maps):
    ``sum_i w_i * vid_i`` (RepDistiller sums the pairs). ``init_pred_var`` 5.0 and ``eps`` 1e-5: the official."""

    def __init__(self, pairs, init_pred_var: float = 5.0, eps: float = 1e-5):
        super().__init__(pairs)
        if not isinstance(init_pred_var, (int, float)) or not init_pred_var > eps:
            raise ConfigError("init_pred_var", init_pred_var, "use an initial variance > eps (the official 5.0)")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError("eps", eps, "use a small number > 0 (the official 1e-5)")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList()

    def bind(self, student, teacher, data, key):
        super().bind(student, teacher, data, key)  # the pairs, checked against both models
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        for i, (s, t, _) in enumerate(self.pairs):
            if len(s_shapes[s]) != 3 or len(t_shapes[t]) != 3:
                shapes = f"{list(s_shapes[s])} and {list(t_shapes[t])}"
                raise ConfigError(f"{key}.pairs.{i}", f"{s}:{t}", f"VID needs 4-D feature maps, got {shapes}")
        self.build([(s_shapes[s][0], t_shapes[t][0]) for s, t, _ in self.pairs])

    def build(self, channels: list[tuple[int, int]]) -> None:
        """One regressor per pair of (student, teacher) channels, as ``VIDLoss(s, t, t)``."""
        self.regressors = nn.ModuleList(VIDRegressor(s, t, t, self.init_pred_var, self.eps) for s, t in channels)

    def forward(self, batch, student, teacher, state):
        total = 0.0
        for (s, t, w), regressor in zip(self.pairs, self.regressors):
            total = total + w * regressor(student["features"][s].float(), teacher["features"][t].float())
        return total
