"""SRD, a simple recipe for distillation (Miles & Mikolajczyk, *Understanding the Role of the Projector in Knowledge
Distillation*, AAAI 2024): a linear projector on the student's pooled penultimate feature, both sides batch-normalized,
a log-sum of powered differences, plus KD on the logits.

As the authors' ``OurDistillationLoss`` (github.com/roymiles/Simple-Recipe-Distillation,
``imagenet/torchdistill/losses/single.py``) and torchdistill's ``SRDLoss`` + ``SRDModelWrapper``::

    z_s = W pool(f_s) + b,  z_t = pool(f_t)                (pool: the spatial mean; W: the projector)
    L   = feature_weight * log(sum |BN(z_s) - BN(z_t)|^p) + logit_weight * T^2 * KL(p_t^T || p_s^T)  [batchmean]

``BN``: batch statistics, no affine parameters, ``eps`` 1e-4 (BatchNorm1d in training mode, as both official codes
train). Official: ``p`` 4, feature weight 2, logit weight 1, T 1. The projector is trained with the student and is
not part of the exported student (it only serves the loss). The teacher side is the teacher's pooled feature per
sample (``teacher_summary``), which replay stores; the batch normalization is formed from the replayed rows
exactly as from the online ones. The math is also a plain function of tensors (:func:`srd_feature_loss`,
:func:`srd_loss`).

Docs: docs/methods/recent-wsld-srd-dot.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.relation import embedding, row_width
from distill_runner.errors import ConfigError
from distill_runner.models.features import check_layer


def batch_standardize(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """BatchNorm1d without affine parameters on the batch's own statistics (biased variance), as in training."""
    return F.batch_norm(z, None, None, training=True, eps=eps)


def srd_feature_loss(z_s: torch.Tensor, z_t: torch.Tensor, exponent: float = 4.0, eps: float = 1e-4) -> torch.Tensor:
    """``log(sum |BN(z_s) - BN(z_t)|^exponent)`` over the batch's projected student and teacher rows [B, D]."""
    diff = (batch_standardize(z_s.float(), eps) - batch_standardize(z_t.float(), eps)).abs()
    return torch.log(diff.pow(exponent).sum())


def srd_loss(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    exponent: float = 4.0,
    feature_weight: float = 2.0,
    logit_weight: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """The whole SRD loss on projected student rows ``z_s`` and teacher rows ``z_t`` and the two logits."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    loss = logit_weight * F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t)
    if feature_weight:  # 0: the logits part alone (batch statistics need two samples)
        loss = loss + feature_weight * srd_feature_loss(z_s, z_t, exponent, eps)
    return loss


def _non_negative(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(key, value, "use a number >= 0 (the official value is in conf/distill/srd.yaml)")
    return float(value)


class SRD(Term):
    """SRD on one student layer (its penultimate feature: a map, pooled, or an embedding) and one teacher layer,
    with the recipe's temperature on the logits (official: 1). ``projector: false`` compares the rows without
    one (equal widths needed)."""

    hyperparameters = ("temperature",)

    def __init__(self, student: str, teacher: str, exponent: float = 4.0, feature_weight: float = 2.0,
                 logit_weight: float = 1.0, eps: float = 1e-4, projector: bool = True):  # fmt: skip
        super().__init__()
        self.exponent = _non_negative("exponent", exponent)
        self.feature_weight = _non_negative("feature_weight", feature_weight)
        self.logit_weight = _non_negative("logit_weight", logit_weight)
        if not _non_negative("eps", eps) > 0:
            raise ConfigError("eps", eps, "use a number > 0 (the official BatchNorm1d eps: 1e-4)")
        if not isinstance(projector, bool):
            raise ConfigError("projector", projector, "use true (a trained linear projector, official) or false")
        self.student, self.teacher, self.eps, self.use_projector = student, teacher, float(eps), projector
        self.projector: nn.Module = nn.Identity()

    def bind(self, student, teacher, data, key):
        check_layer(student, self.student, f"{key}.student", "student")
        check_layer(teacher, self.teacher, f"{key}.teacher", "teacher")
        self.student_layers, self.teacher_layers = (self.student,), (self.teacher,)
        ds, dt = row_width(student, self.student, data, True), row_width(teacher, self.teacher, data, True)
        if self.use_projector:
            self.projector = nn.Linear(ds, dt)
        elif ds != dt:
            fix = f"student rows have {ds} values, teacher rows {dt}: set projector: true or pick layers of one width"
            raise ConfigError(f"{key}.projector", False, fix)

    def teacher_summary(self, layer, feature):
        """The teacher's pooled feature per sample [B, D]: what replay stores for this term."""
        return embedding(feature, pool=True)

    def forward(self, batch, student, teacher, state: TermState):
        z_s = self.projector(embedding(student["features"][self.student], pool=True))
        z_t = teacher["features"][self.teacher].float()
        feature_weight = self.feature_weight if len(z_s) > 1 else 0.0  # a last batch of one: the logits part alone
        return srd_loss(z_s, z_t, student["logits"], teacher["logits"], state.temperature, self.exponent,
                        feature_weight, self.logit_weight, self.eps)  # fmt: skip
