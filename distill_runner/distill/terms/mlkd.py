"""Multi-level logit distillation, MLKD (Jin, Wang & Lin, CVPR 2023), on the one view the runner gives.

With ``P = softmax(z / T)`` of shape (batch B, classes C), for each temperature T in the recipe's
``temperature`` followed by ``extra_temperatures`` (official: 4, then 3, 5, 2, 6, "prediction augmentation"):

- instance level: ``T^2 * mean_i KL(P_t,i || P_s,i)`` (Hinton KD);
- batch level: ``||P_t P_t^T - P_s P_s^T||_F^2 / B``, the B x B sample-relation Gram matrices;
- class level: ``||P_t^T P_t - P_s^T P_s||_F^2 / C``, the C x C class-relation Gram matrices;

    mlkd = sum_T  m_s * instance(T) + m_s * batch(T) + m_c * class(T)

The masks come from the teacher at temperature 1: ``m_s`` is the fraction of samples whose max probability
is at most the batch's median, ``m_c`` the fraction of classes whose summed probability is at most the
median over classes. In the official code (KD_ours.py, github Jin-Ying/Multi-Level-Logit-Distillation, the
commit in tests/reference/mlkd.json) the losses are reduced to scalars before ``* mask`` (``reduce=False``
is commented out), so a mask scales its levels by that fraction (0.5 for an even batch of distinct
confidences) and selects nothing; we reproduce that. The batch and class levels couple samples, so no
per-sample weights apply.

Official terms covered: ``loss_kd_weak + loss_cc_weak + loss_bc_weak`` of ``forward_train`` (cc: class
level, bc: batch level), divided by ``KD_WEIGHT`` (the recipe's weight on this term). The official method
also trains on a second, strongly augmented view (RandAugment(2, 10) + Cutout): CE on it, and unmasked KD
at temperatures 4, 3, 5 (``loss_kd_strong``, whose T = 2, 6 terms reuse the weak logits, unmasked);
``loss_cc_strong`` and ``loss_bc_strong`` are computed but never added to the loss. The runner gives one
augmented view per step by default, so that strong branch is omitted. ``strong_view=True`` adds it, on the
strong view CRLD uses (:mod:`distill_runner.data.strong_augment`, ``strong``: its ops and Cutout): the
official ``loss_kd_strong / KD_WEIGHT``, unmasked KD on the strong view at the first three temperatures and on
the weak view at the rest (:func:`strong_branch`); the strong view's CE is the recipe's ``StrongCrossEntropy``
term (``conf/distill/mlkd_strong.yaml``, equal to the official total: tests/reference/mlkd_strong.json).

``logit_standardization=True`` z-scores student and teacher logits with :func:`standardize` before the
temperature in the instance level only, as the LS paper's MLKD (Sun et al., CVPR 2024, github
sunshangquan/logit-standardization-KD, mdistiller/distillers/MLKD.py) does; the Gram matrices and the
masks stay on the raw logits there, and here.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_runner.data.strong_augment import parse_strong
from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.crld import require_strong_view
from distill_runner.distill.terms.logits import kd_per_sample, standardize
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number


def confidence_fractions(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``m_s``, ``m_c``: the fractions of samples (by max probability) and classes (by summed probability)
    at or below their median, the teacher at temperature 1 (np.percentile(..., 50) in the official code)."""
    p = F.softmax(teacher_logits.float(), dim=1)
    confidence, class_confidence = p.max(1).values, p.sum(0)
    at_most_median = lambda x: (x <= torch.quantile(x, 0.5)).float().mean()
    return at_most_median(confidence), at_most_median(class_confidence)


def relation_gap(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """``||p_t p_t^T - p_s p_s^T||_F^2 / rows``: pass (B, C) for the batch level, (C, B) for the class level."""
    gap = p_teacher @ p_teacher.T - p_student @ p_student.T
    return gap.pow(2).sum() / p_student.shape[0]


STRONG_TEMPERATURES = 3  # official: KD at T, 3, 5 on the strong view, at 2, 6 on the weak view


def strong_branch(s_weak, s_strong, t_weak, t_strong, temperatures) -> torch.Tensor:
    """The official ``loss_kd_strong`` (per unit of KD weight): ``sum_k mean_i T_k^2 KL`` unmasked, on the strong
    view for the first :data:`STRONG_TEMPERATURES` temperatures and on the weak view for the others."""
    loss = s_weak.new_zeros(())
    for k, temperature in enumerate(temperatures):
        s, t = (s_strong, t_strong) if k < STRONG_TEMPERATURES else (s_weak, t_weak)
        loss = loss + kd_per_sample(s, t.detach(), temperature).mean()
    return loss


def _check_temperatures(temperatures) -> list[float]:
    fix = "use a list of numbers > 0, e.g. [3.0, 5.0, 2.0, 6.0] (official), or [] for the recipe's temperature alone"
    if not isinstance(temperatures, (list, tuple)):
        raise ConfigError("extra_temperatures", temperatures, fix)
    for t in temperatures:
        if not is_number(t) or t <= 0:
            raise ConfigError("extra_temperatures", temperatures, fix)
    return [float(t) for t in temperatures]


class MLKD(Term):
    """Instance-, batch- and class-level logit alignment at the recipe's ``temperature`` and each of
    ``extra_temperatures``; the official weak-view loss (see the module docstring)."""

    hyperparameters = ("temperature",)

    def __init__(
        self,
        extra_temperatures=(3.0, 5.0, 2.0, 6.0),
        logit_standardization: bool = False,
        strong_view: bool = False,
        strong=None,
    ):
        super().__init__()
        self.extra_temperatures = _check_temperatures(extra_temperatures)
        for key, value in (("logit_standardization", logit_standardization), ("strong_view", strong_view)):
            if not isinstance(value, bool):
                raise ConfigError(key, value, "use true or false")
        if strong_view and logit_standardization:
            fix = (
                "the strong branch is checked against the MLKD code only, without logit standardization; set one false"
            )
            raise ConfigError("strong_view", strong_view, fix)
        self.logit_standardization, self.strong_view = logit_standardization, strong_view
        if strong_view:  # the loader adds the strong view; the loop and the teacher signal give its logits
            self.views, self.strong_augment = ("weak", "strong"), parse_strong(strong)

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"].float(), teacher["logits"].detach().float()
        # the Gram matrices are matmuls, which autocast would run in half precision
        with torch.autocast(s.device.type, enabled=False):
            with torch.no_grad():
                sample_fraction, class_fraction = confidence_fractions(t)
            s_inst, t_inst = (standardize(s), standardize(t)) if self.logit_standardization else (s, t)
            loss = s.new_zeros(())
            for temperature in [state.temperature, *self.extra_temperatures]:
                p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
                instance = kd_per_sample(s_inst, t_inst, temperature).mean()
                loss = loss + sample_fraction * (instance + relation_gap(p_s, p_t))
                loss = loss + class_fraction * relation_gap(p_s.T, p_t.T)
            if self.strong_view:
                require_strong_view(student, teacher)
                temperatures = [state.temperature, *self.extra_temperatures]
                strong = student["strong_logits"].float(), teacher["strong_logits"].float()
                loss = loss + strong_branch(s, strong[0], t, strong[1], temperatures)
            return loss
