"""SDD, scale decoupled distillation (Wei, Luo, Luo; CVPR 2024), as a plug-in over KD, DKD and NKD.

The final feature map is average-pooled into regions at scales 1, 2 and 4 (1 + 4 + 16 = 21 regions; the
official ``SPP`` pools to 4x4 first and the coarser scales from that) and each region goes through the
model's own classifier: multi-scale logits ``[B, classes, regions]``, region 0 the global one (the model's
logits). The base loss (KD, DKD or NKD) is taken per region and sample; a region whose teacher prediction
is right while the global one is wrong, or the reverse (complementary), weighs 2, the others (consistent) 1;
the sum is divided by regions x batch.

The teacher side is a function of the frozen teacher alone: ``teacher_summary`` turns its feature map into
its multi-scale logits through its (constant) classifier, which replay stores. The student side uses the
student's classifier as it trains: both heads are named module paths that map a pooled feature ``[B, C]``
to logits (``fc`` in the CIFAR zoo and torchvision ResNets; the tiny CNN's ``classifier`` with
``student.model.pool_size=1``). The term keeps references to them (not parameters of the recipe).

The loss math is a plain function of tensors: :func:`multi_scale_logits` and :func:`sdd_loss`.

Docs: docs/methods/recent.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.logits import dkd_per_sample, kd_per_sample
from distill_runner.errors import ConfigError
from distill_runner.models.features import check_layer, feature_shapes
from distill_runner.schema import is_number

BASES = ("kd", "dkd", "nkd")
SCALES = (1, 2, 4)


def multi_scale_logits(feature: torch.Tensor, head, scales=SCALES) -> torch.Tensor:
    """``head`` on the regions of ``feature`` [B, C, H, W] at ``scales`` (the official SPP: a 4x4 average pool,
    each scale pooled from it, regions in row-major order, scale 1 first): [B, classes, regions]."""
    base = F.adaptive_avg_pool2d(feature, 4)
    regions = torch.cat([F.adaptive_avg_pool2d(base, s).flatten(2) for s in scales], 2)  # [B, C, N]
    b, c, n = regions.shape
    logits = head(regions.permute(2, 0, 1).reshape(n * b, c))  # region-major rows, as the official reshape
    return logits.view(n, b, -1).permute(1, 2, 0)


def sdd_nkd_per_sample(student_logits, teacher_logits, target, temperature: float, gamma: float) -> torch.Tensor:
    """SDD's NKD per sample (its ``nkd_loss``): ``-p_t[y] log p_s[y] - gamma T^2 sum_k q_t(k) log q_s(k)`` with
    ``q`` the softmax at temperature T over EVERY class (its mask keeps the target class, as cls_KD's NKD before
    its 2023-10-10 fix; :func:`~distill_runner.distill.terms.nkd.nkd_per_sample` removes it)."""
    s, t = student_logits.float(), teacher_logits.float().detach()
    y = target[:, None]
    target_part = -F.softmax(t, 1).gather(1, y) * F.log_softmax(s, 1).gather(1, y)
    non_target = (F.softmax(t / temperature, 1) * F.log_softmax(s / temperature, 1)).sum(1)
    return target_part.squeeze(1) - gamma * temperature**2 * non_target


def region_weights(teacher_rows: torch.Tensor, target_rows: torch.Tensor, batch: int) -> torch.Tensor:
    """1 where a region's teacher prediction is right exactly when the global one is (consistent), else 2
    (complementary); rows region-major, the first ``batch`` rows the global region."""
    local = teacher_rows.argmax(1) == target_rows
    global_ = local[:batch].repeat(len(local) // batch)
    return torch.where(local == global_, 1.0, 2.0)


def sdd_loss(
    student_multi: torch.Tensor,
    teacher_multi: torch.Tensor,
    target: torch.Tensor,
    base: str = "kd",
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    gamma: float = 8.0,
) -> torch.Tensor:
    """SDD over multi-scale logits [B, classes, regions] (official ``sdd_kd_loss``, ``multi_dkd``,
    ``multi_nkd_loss``): ``sum(weight * base loss per region and sample) / (regions * B)``."""
    b, k, n = student_multi.shape
    s = student_multi.permute(2, 0, 1).reshape(n * b, k).float()
    t = teacher_multi.permute(2, 0, 1).reshape(n * b, k).float().detach()
    target_rows = target.repeat(n)
    if base == "kd":
        values = kd_per_sample(s, t, temperature)
    elif base == "dkd":
        values = dkd_per_sample(s, t, target_rows, alpha, beta, temperature)
    else:
        values = sdd_nkd_per_sample(s, t, target_rows, temperature, gamma)
    return (values * region_weights(t, target_rows, b)).sum() / (n * b)


class _Heads:
    """The classifiers the term reads, held outside the module tree: they belong to the models (the student's
    trains with the student; the teacher's is frozen), not to the recipe."""

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None):
        self.student, self.teacher = student, teacher


def classifier_head(model: nn.Module, path: str, channels: int, classes: int, key: str, role: str) -> nn.Module:
    """The module at ``path`` of ``model``, checked to map a pooled feature [B, channels] to [B, classes]."""
    check_layer(model, path, key, role)
    head = dict(model.named_modules())[path]
    was_training = head.training
    try:
        with torch.no_grad():
            shape = tuple(head.eval()(torch.zeros(2, channels, device=next(head.parameters()).device)).shape)
    except (RuntimeError, StopIteration):
        shape = None
    finally:
        head.train(was_training)
    if shape != (2, classes):
        fix = (f"name the {role}'s classifier that maps its pooled {channels}-channel feature to the {classes} logits "
               "(fc for ResNets; the tiny CNN's classifier needs student.model.pool_size=1)")  # fmt: skip
        raise ConfigError(key, path, fix)
    return head


def map_channels(model: nn.Module, layer: str, data, key: str) -> int:
    """Channels of the 4-D feature map at ``layer``; a layer that is not one is one line."""
    shape = feature_shapes(model, (layer,), data.in_channels, data.image_size)[layer]
    if len(shape) != 3:
        raise ConfigError(key, layer, f"needs a 4-D feature map, got {list(shape)} per sample; name a conv stage")
    return shape[0]


class _HeadTerm(Term):
    """A term on one student and one teacher feature map, each with its model's classifier head."""

    def __init__(self, student: str, teacher: str, student_head: str, teacher_head: str):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.student_head, self.teacher_head = student_head, teacher_head
        self.heads = _Heads()

    def bind(self, student, teacher, data, key):
        check_layer(student, self.student, f"{key}.student", "student")
        check_layer(teacher, self.teacher, f"{key}.teacher", "teacher")
        cs = map_channels(student, self.student, data, f"{key}.student")
        ct = map_channels(teacher, self.teacher, data, f"{key}.teacher")
        k = data.num_classes
        self.heads = _Heads(
            classifier_head(student, self.student_head, cs, k, f"{key}.student_head", "student"),
            classifier_head(teacher, self.teacher_head, ct, k, f"{key}.teacher_head", "teacher"),
        )
        self.student_layers, self.teacher_layers = (self.student,), (self.teacher,)


class SDD(_HeadTerm):
    """SDD over ``base`` (kd: the recipe's temperature; dkd: its temperature, alpha, beta; nkd: its temperature and
    ``gamma``) at ``scales`` (a subset of 1, 2, 4 starting with 1; paper: [1, 2, 4])."""

    hyperparameters = ("temperature",)  # every base reads it; dkd adds alpha and beta (set per instance)

    def __init__(self, student: str, teacher: str, student_head: str = "fc", teacher_head: str = "fc",
                 base: str = "kd", scales=SCALES, gamma: float = 8.0):  # fmt: skip
        super().__init__(student, teacher, student_head, teacher_head)
        if base not in BASES:
            raise ConfigError("base", base, f"use one of {', '.join(BASES)}")
        scales = list(scales) if isinstance(scales, (list, tuple)) else scales
        if not isinstance(scales, list) or not scales or scales[0] != 1 or not set(scales) <= set(SCALES):
            raise ConfigError("scales", scales, "use 1 first, then 2 and/or 4, e.g. [1, 2, 4] (the paper) or [1, 2]")
        if len(set(scales)) != len(scales):
            raise ConfigError("scales", scales, "name each scale once, e.g. [1, 2, 4]")
        if not is_number(gamma) or gamma < 0:
            raise ConfigError("gamma", gamma, "must be a finite number >= 0 (NKD's non-target weight), e.g. 8")
        self.base, self.scales, self.gamma = base, tuple(scales), float(gamma)
        self.hyperparameters = ("temperature", "alpha", "beta") if base == "dkd" else ("temperature",)

    def teacher_summary(self, layer, feature):
        """The teacher's multi-scale logits [B, classes, regions] (what replay stores)."""
        with torch.no_grad():
            return multi_scale_logits(feature.float(), self.heads.teacher, self.scales)

    def forward(self, batch, student, teacher, state: TermState):
        s = multi_scale_logits(student["features"][self.student].float(), self.heads.student, self.scales)
        t = teacher["features"][self.teacher].float()
        return sdd_loss(s, t, batch["target"], self.base, state.temperature, state.alpha, state.beta, self.gamma)
