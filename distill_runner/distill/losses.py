"""Loss recipes.

A recipe turns (batch, student outputs, teacher outputs) into a dict of named, already weighted
loss terms; the training loop sums them, logs each one and steps. Outputs are dicts with at least
``"logits"``. A recipe that needs a teacher says so with ``needs_teacher = True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distill_runner.errors import ConfigError

Outputs = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    ``reduction='batchmean'`` is the true KL per sample; the T^2 keeps gradient magnitudes
    comparable across temperatures. Computed in float32 for stability under autocast.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


class CrossEntropy:
    """Plain supervised training: the teacher's fine-tune and the scratch baseline.

    ``class_weights`` (one per class, e.g. inverse frequency for imbalanced data) weight each
    sample's loss by its class, as ``F.cross_entropy(weight=...)`` does.
    """

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | torch.Tensor | None = None):
        self.label_smoothing = label_smoothing
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)

    def __call__(self, batch: Batch, student: Outputs, teacher: Outputs | None = None) -> dict[str, torch.Tensor]:
        logits = student["logits"].float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return {"ce": F.cross_entropy(logits, batch["target"], weight=weight, label_smoothing=self.label_smoothing)}


class HintonKD:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``."""

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0, class_weights=None):
        if not temperature > 0:
            raise ConfigError("temperature", temperature, "must be > 0 (typical values 1-8)")
        if not 0 <= alpha <= 1:
            raise ConfigError(
                "alpha", alpha, "must be in [0, 1]: the weight of the KD term (1 - alpha weights cross-entropy)"
            )
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.ce = CrossEntropy(label_smoothing, class_weights)

    def __call__(self, batch: Batch, student: Outputs, teacher: Outputs | None) -> dict[str, torch.Tensor]:
        terms = {}
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_divergence(student["logits"], teacher["logits"], self.temperature)
        if self.alpha < 1:
            terms["ce"] = (1 - self.alpha) * self.ce(batch, student)["ce"]
        return terms
