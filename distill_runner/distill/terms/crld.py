"""CRLD, cross-view consistency regularisation (Zhang, Liu, Cai & Ma, ACM MM 2024), on a weak and a strong view.

Every image comes twice: ``w`` (the data set's augmentation) and ``s`` (a strong view: that augmentation
drawn again, then RandAugment-style ops and Cutout, :mod:`distill_runner.data.strong_augment`). Student and
teacher see both. With ``kd(z_s, z_t) = T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per sample and the
teacher's confidence masks ``m_w = max softmax(t_w) >= tau_w``, ``m_s = max softmax(t_s) >= tau_s``:

    within-view  wv = w_wv * mean_i (kd(s_w, t_w) + kd(s_s, t_s)) * m_w
    cross-view   cv = w_cv * mean_i (kd(s_s, t_w) + kd(s_w, t_s)) * m_s
    crld = ce_strong * CE(s_s, y) + wv + cv

and the recipe adds ``CE(s_w, y)`` (its ``ce`` term): the official total ``CE_WEIGHT * (CE_w + CE_s) +
loss_kd_wv + loss_kd_cv`` (mdistiller/distillers/CRLD.py of github ZaberKo/CRLD; the commit and the values
in tests/reference/crld.json). Official CIFAR-100 settings (mdistiller/engine/cfg.py): T 4, tau_w 0.9,
tau_s 0.2, w_wv 2.0, w_cv 0.5, CE 1.0. Both masks are the mean over the whole batch (masked samples count
as zeros), and the cross-view pair is masked by the strong view's confidence, as in the official code.
The masks couple nothing across samples but select them, so no per-sample weights apply.

The student's and the teacher's logits on the strong view reach the term as ``strong_logits`` (the loop
runs the student on ``batch["image_strong"]``; the teacher signal adds its own, replayed per epoch like the
weak view's: :mod:`distill_runner.distill.signals`).

Docs: docs/methods/recent-crld.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_runner.data.strong_augment import parse_strong
from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.logits import kd_per_sample
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number


def confidence_mask(teacher_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 where the teacher's top softmax probability (temperature 1) is at least ``threshold``, else 0.0."""
    return (F.softmax(teacher_logits.detach().float(), dim=1).max(1).values >= threshold).float()


def crld_losses(
    student_weak: torch.Tensor,
    student_strong: torch.Tensor,
    teacher_weak: torch.Tensor,
    teacher_strong: torch.Tensor,
    temperature: float,
    tau_w: float = 0.9,
    tau_s: float = 0.2,
    wv_weight: float = 2.0,
    cv_weight: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(within-view, cross-view) losses of CRLD, weighted (the official ``loss_kd_wv``, ``loss_kd_cv``)."""
    t_w, t_s = teacher_weak.detach().float(), teacher_strong.detach().float()
    mask_w, mask_s = confidence_mask(t_w, tau_w), confidence_mask(t_s, tau_s)
    kd = lambda s, t: kd_per_sample(s, t, temperature)
    within = wv_weight * ((kd(student_weak, t_w) + kd(student_strong, t_s)) * mask_w).mean()
    cross = cv_weight * ((kd(student_strong, t_w) + kd(student_weak, t_s)) * mask_s).mean()
    return within, cross


def _number(key: str, value, low: float, high: float | None, fix: str) -> float:
    if not is_number(value) or value < low or (high is not None and value > high):
        raise ConfigError(key, value, fix)
    return float(value)


def _class_weights(term, student, teacher, data, key) -> None:
    """A strong view's cross-entropy weighs classes as the recipe's ``ce`` term does (dataset.balance)."""
    if data.class_weights is not None:
        term.class_weights = torch.as_tensor(data.class_weights, dtype=torch.float32)


def require_strong_view(student, teacher) -> None:
    """One clear line where a term asking for the strong view is called without its logits (outside the runner)."""
    if "strong_logits" not in student or (teacher is not None and "strong_logits" not in teacher):
        fix = "the strong view is missing: run the recipe through the runner, which adds image_strong to the batches"
        raise ConfigError("distill.terms", "views", fix)


class StrongCrossEntropy(Term):
    """Cross-entropy with the labels on the strong view (official MLKD's and CRLD's ``CE(s_s)``); ``strong``: the
    view's ops and Cutout, as :class:`CRLD`'s."""

    needs_teacher = False
    views = ("weak", "strong")

    def __init__(self, strong=None):
        super().__init__()
        self.strong_augment = parse_strong(strong)
        self.register_buffer("class_weights", None, persistent=False)

    bind = _class_weights

    def forward(self, batch, student, teacher, state: TermState):
        require_strong_view(student, None)
        weight = None if self.class_weights is None else self.class_weights.to(student["strong_logits"].device)
        return F.cross_entropy(student["strong_logits"].float(), batch["target"], weight=weight)


class CRLD(Term):
    """Within- and cross-view consistency between the student and the teacher on a weak and a strong view,
    plus the strong view's cross-entropy (see the module docstring); temperature: the recipe's."""

    hyperparameters = ("temperature",)
    views = ("weak", "strong")

    def __init__(
        self,
        tau_w: float = 0.9,
        tau_s: float = 0.2,
        wv_weight: float = 2.0,
        cv_weight: float = 0.5,
        ce_strong: float = 1.0,
        strong=None,
    ):
        super().__init__()
        prob = "use a teacher confidence in [0, 1] (official: tau_w 0.9, tau_s 0.2)"
        self.tau_w = _number("tau_w", tau_w, 0.0, 1.0, prob)
        self.tau_s = _number("tau_s", tau_s, 0.0, 1.0, prob)
        weight = "use a weight >= 0 (official: wv_weight 2.0, cv_weight 0.5, ce_strong 1.0)"
        self.wv_weight = _number("wv_weight", wv_weight, 0.0, None, weight)
        self.cv_weight = _number("cv_weight", cv_weight, 0.0, None, weight)
        self.ce_strong = _number("ce_strong", ce_strong, 0.0, None, weight)
        self.strong_augment = parse_strong(strong)
        self.register_buffer("class_weights", None, persistent=False)

    bind = _class_weights

    def forward(self, batch, student, teacher, state: TermState):
        if "strong_logits" not in student or "strong_logits" not in teacher:
            raise ConfigError(
                "distill.terms",
                "CRLD",
                "the strong view is missing: run CRLD through the runner (it adds image_strong)",
            )
        s_w, s_s = student["logits"].float(), student["strong_logits"].float()
        within, cross = crld_losses(
            s_w,
            s_s,
            teacher["logits"],
            teacher["strong_logits"],
            state.temperature,
            self.tau_w,
            self.tau_s,
            self.wv_weight,
            self.cv_weight,
        )
        weight = None if self.class_weights is None else self.class_weights.to(s_s.device)
        strong_ce = F.cross_entropy(s_s, batch["target"], weight=weight) if self.ce_strong else s_s.new_zeros(())
        return self.ce_strong * strong_ce + within + cross
