"""Normalized KD (Yang, Zeng, Yuan and Li, ICCV 2023): "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels".

Per sample, with ``p = softmax(logits)`` and ``q = softmax`` over the non-target classes only (the
target class removed, so ``q`` sums to 1 over the others)::

    nkd = -p_t[y] * log p_s[y]  -  gamma * T^2 * sum_{k != y} q_t(k / T) * log q_s(k / T)

The target part is at temperature 1; the non-target part is a cross-entropy between the teacher's and
the student's normalized non-target distributions at temperature T. Its batch mean equals the official
``NKDLoss`` (github yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py) as fixed on 2023-10-10 (the commit is in
tests/reference/nkd.json), which removed the target class from the non-target part; before it the mask kept every class.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.logits import standardize, weighted_mean
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number


def nkd_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> torch.Tensor:
    """NKD per sample (see the module docstring), in float32; the teacher gets no gradient."""
    s, t = student_logits.float(), teacher_logits.float().detach()
    n, c = s.shape
    y = target[:, None]
    target_part = -F.softmax(t, 1).gather(1, y) * F.log_softmax(s, 1).gather(1, y)
    # drop the target column: each row keeps its c - 1 non-target logits, in order
    non_target = torch.ones_like(s, dtype=torch.bool).scatter_(1, y, False)
    s_other, t_other = s[non_target].view(n, c - 1), t[non_target].view(n, c - 1)
    q_t = F.softmax(t_other / temperature, 1)
    log_q_s = F.log_softmax(s_other / temperature, 1)
    non_target_part = -(q_t * log_q_s).sum(1) * (gamma * temperature**2)
    return target_part.squeeze(1) + non_target_part


class NKD(Term):
    """Normalized KD at the recipe's temperature, weighting the non-target part by ``gamma``
    (official CIFAR-100 setting: temperature 3, gamma 3.5; class default and ImageNet CNNs: 1, 1.5).

    ``logit_standardization`` z-scores student and teacher logits (:func:`standardize`) before both
    parts. The LS paper (Sun et al., CVPR 2024) and its code do not apply it to NKD: the switch is
    offered for uniformity with the other logit terms, not as a published setting.
    """

    hyperparameters = ("temperature",)
    weighs_samples = True

    def __init__(self, gamma: float = 1.5, logit_standardization: bool = False):
        super().__init__()
        if not is_number(gamma) or gamma < 0:
            raise ConfigError("gamma", gamma, "must be a finite number >= 0 (the non-target weight), e.g. 1.5 or 3.5")
        if not isinstance(logit_standardization, bool):
            raise ConfigError("logit_standardization", logit_standardization, "use true or false")
        self.gamma = float(gamma)
        self.logit_standardization = logit_standardization

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"], teacher["logits"]
        if self.logit_standardization:
            s, t = standardize(s), standardize(t)
        values = nkd_per_sample(s, t, batch["target"], state.temperature, self.gamma)
        return weighted_mean(values, state.sample_weights)
