"""CAT-KD, class attention transfer based knowledge distillation (Guo, Yan, Li, Lin; CVPR 2023).

Class activation maps: each model's classifier weights applied at every position of its final feature map,
``CAM[b, k] = W[k] . f[b, :, h, w]`` (the official ``_test`` models' bias-free 1x1 ``conv_test``; an
``nn.Linear`` head's bias is left out as there; another head, such as the tiny CNN's MLP, runs per position
as it is). Both CAMs are average-pooled to ``resolution`` x ``resolution``, optionally L2-normalized over
space per class (``normalize``), and compared by MSE.

The teacher side is a function of the frozen teacher alone: ``teacher_summary`` keeps its pooled
(normalized) CAMs, ``[B, classes, r, r]``, which replay stores. The student's CAMs use its classifier as it
trains (the term holds a reference to it, as SDD does). The CAT variants of the paper (binarized CAMs, the
CAMs of some classes only) are not offered.

The loss math is a plain function of tensors: :func:`class_activation_maps` and :func:`cat_loss`.

Docs: docs/methods/recent.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.sdd import _HeadTerm
from distill_runner.errors import ConfigError


def class_activation_maps(feature: torch.Tensor, head) -> torch.Tensor:
    """[B, C, H, W] -> [B, classes, H, W]: a Linear head's weights at every position (no bias), or ``head`` per
    position."""
    if isinstance(head, nn.Linear):
        return torch.einsum("bchw,kc->bkhw", feature, head.weight.to(feature.dtype))
    b, c, h, w = feature.shape
    return head(feature.permute(0, 2, 3, 1).reshape(b * h * w, c)).view(b, h, w, -1).permute(0, 3, 1, 2)


def pooled_cams(cams: torch.Tensor, resolution: int, normalize: bool) -> torch.Tensor:
    """CAMs average-pooled to ``resolution`` squared, L2-normalized over space per class when ``normalize``."""
    cams = F.adaptive_avg_pool2d(cams, resolution)
    return F.normalize(cams, dim=(2, 3)) if normalize else cams


def cat_loss(student_cams, teacher_cams, resolution: int = 2, normalize: bool = False) -> torch.Tensor:
    """The official ``CAT_loss``: MSE between the pooled (normalized) CAMs."""
    s, t = (pooled_cams(cams, resolution, normalize) for cams in (student_cams, teacher_cams))
    return F.mse_loss(s, t)


class CATKD(_HeadTerm):
    """CAT-KD on one student and one teacher final feature map with their classifiers (``student_head``,
    ``teacher_head``); ``resolution`` and ``normalize`` as the official ``CAM_RESOLUTION``, ``IF_NORMALIZE``.
    The official weight (``CAT_loss_weight``) is the term's weight."""

    def __init__(self, student: str, teacher: str, student_head: str = "fc", teacher_head: str = "fc",
                 resolution: int = 2, normalize: bool = False):  # fmt: skip
        super().__init__(student, teacher, student_head, teacher_head)
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
            raise ConfigError("resolution", resolution, "use a whole number >= 1 (official CIFAR-100: 2, or 4)")
        if not isinstance(normalize, bool):
            raise ConfigError("normalize", normalize, "use true or false")
        self.resolution, self.normalize = resolution, normalize

    def teacher_summary(self, layer, feature):
        """The teacher's pooled (normalized) CAMs [B, classes, r, r] (what replay stores)."""
        with torch.no_grad():
            cams = class_activation_maps(feature.float(), self.heads.teacher)
            return pooled_cams(cams, self.resolution, self.normalize)

    def forward(self, batch, student, teacher, state: TermState):
        cams = class_activation_maps(student["features"][self.student].float(), self.heads.student)
        return F.mse_loss(pooled_cams(cams, self.resolution, self.normalize), teacher["features"][self.teacher].float())
