"""Transformed teacher matching (Zheng & Yang, ICLR 2024): TTM and its sample-weighted form WTTM.

KD scales both teacher and student by a temperature; TTM scales only the teacher. The teacher's
probabilities are power-transformed, ``q_t = p_t^gamma / sum_j p_{t,j}^gamma`` (which equals
``softmax(gamma * teacher_logits)``, i.e. temperature ``1 / gamma``), and the student at temperature 1
matches them: ``KL(q_t || softmax(s))``. WTTM weighs each sample's KL by ``U = sum_j p_{t,j}^gamma``,
large where the teacher is unsure. No T^2 factor: the official code has none.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.logits import standardize, weighted_mean
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number


def transformed_teacher_matching(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: ``KL(q_t || softmax(s))`` and the power sum ``U = sum_j p_{t,j}^gamma``.

    Computed in log space (``log U = logsumexp(gamma * log p_t)``), so a confident teacher's tiny
    probabilities neither underflow nor divide by zero.
    """
    log_p_s = F.log_softmax(student_logits.float(), dim=1)
    powered = gamma * F.log_softmax(teacher_logits.float(), dim=1)  # log p_t^gamma
    log_u = torch.logsumexp(powered, dim=1, keepdim=True)
    log_q_t = powered - log_u
    kl = (log_q_t.exp() * (log_q_t - log_p_s)).sum(1)
    return kl, log_u.squeeze(1).exp()


class TTM(Term):
    """Transformed teacher matching: ``mean_i KL(q_t,i || softmax(s_i))`` with ``q_t = softmax(gamma * t)``.

    ``gamma`` is the paper's exponent of the power transform (the official code's ``--ttm_l``;
    ``gamma = 1 / T``), the term's own key since the student has no temperature; the recipe's
    ``temperature`` is not read. ``logit_standardization`` z-scores student and teacher logits first
    (Sun et al., CVPR 2024); the official TTM code does not, so this is an extension of ours.
    """

    weighs_samples = True
    weighted = False  # WTTM: weigh each sample by the teacher's power sum U

    def __init__(self, gamma: float = 0.1, logit_standardization: bool = False):
        super().__init__()
        if not is_number(gamma) or gamma <= 0:
            fix = "the power-transform exponent (1/temperature) must be a finite number > 0, e.g. 0.1"
            raise ConfigError("gamma", gamma, fix)
        if not isinstance(logit_standardization, bool):
            raise ConfigError("logit_standardization", logit_standardization, "use true or false")
        self.gamma, self.logit_standardization = float(gamma), logit_standardization

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"], teacher["logits"].detach()  # the teacher is a fixed target, as in the official code
        if self.logit_standardization:
            s, t = standardize(s), standardize(t)
        kl, power_sum = transformed_teacher_matching(s, t, self.gamma)
        return weighted_mean(power_sum * kl if self.weighted else kl, state.sample_weights)


class WTTM(TTM):
    """Weighted TTM: ``mean_i U_i * KL(q_t,i || softmax(s_i))``, ``U_i = sum_j p_{t,i,j}^gamma``.

    ``U`` ranges from 1 (one-hot teacher) to ``C^(1 - gamma)`` (uniform teacher over C classes) for
    gamma < 1, so WTTM's weight in a recipe is smaller than TTM's for the same strength.
    """

    weighted = True

    def __init__(self, gamma: float = 0.2, logit_standardization: bool = False):
        super().__init__(gamma, logit_standardization)
