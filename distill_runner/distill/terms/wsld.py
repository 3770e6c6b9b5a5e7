"""WSLD, weighted soft labels (Zhou et al., *Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance
Tradeoff Perspective*, ICLR 2021): KD whose per-sample soft-label loss is weighted by how much worse the student
does on the true class than the teacher.

As the official ``WSLDistiller`` (github.com/bellymonster/Weighted-Soft-Label-Distillation,
``knowledge_distiller.py``), per sample ``i``::

    w_i = 1 - exp(-max(CE(s_i, y_i) / (CE(t_i, y_i) + 1e-7), 0))      (T = 1, both logits detached)
    L   = T^2 * mean_i w_i * CE(softmax(t_i / T), log_softmax(s_i / T))

The soft-label loss is the cross-entropy with the teacher's softened distribution, as the official code: it is
KD's KL plus the teacher's entropy (a constant of the student), so the gradient is KD's and the value is larger.
The teacher side is its logits alone: replayed like KD's. The math is also a plain function of tensors
(:func:`wsld_weights`, :func:`wsld_per_sample`, :func:`wsld_loss`).

Docs: docs/methods/recent-wsld-srd-dot.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.logits import weighted_mean


def wsld_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The per-sample weights ``1 - exp(-CE_s / (CE_t + 1e-7))`` (cross-entropies at T = 1, no gradient) [B]."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits.float(), target, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.float(), target, reduction="none")
        return 1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp(min=0))


def wsld_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * w_i * CE(softmax(t_i / T), log_softmax(s_i / T))`` per sample [B]."""
    t = temperature
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    soft = -(p_t * F.log_softmax(student_logits.float() / t, dim=1)).sum(1)
    return wsld_weights(student_logits, teacher_logits, target) * soft * (t * t)


def wsld_loss(student_logits, teacher_logits, target, temperature: float) -> torch.Tensor:
    """The official soft loss: the batch mean of :func:`wsld_per_sample` (the recipe weighs it by alpha, 2.5)."""
    return wsld_per_sample(student_logits, teacher_logits, target, temperature).mean()


class WSLD(Term):
    """Weighted soft labels at the recipe's temperature (official: T 2, weight 2.5, with CE at weight 1); the
    recipe's per-sample weights (class balance, teacher confidence) multiply WSLD's own."""

    hyperparameters = ("temperature",)
    weighs_samples = True

    def forward(self, batch, student, teacher, state: TermState):
        values = wsld_per_sample(student["logits"], teacher["logits"], batch["target"], state.temperature)
        return weighted_mean(values, state.sample_weights)
