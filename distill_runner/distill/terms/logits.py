"""Terms on logits: cross-entropy, Hinton KD, decoupled KD.

Every function computes in float32 (safe under autocast). KD and DKD return one value per sample,
so the recipe's sample weights (class balance, teacher confidence) apply before the mean.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_runner.distill.contract import Term, TermState
from distill_runner.errors import ConfigError


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): z-score each sample's logits over the classes,
    ``(z - mean) / (std + 1e-7)`` with the unbiased std, as the official code does; applied before
    the temperature, it makes the student match the teacher's logit relations, not their scale."""
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015) per sample: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Its mean over the batch is ``F.kl_div(..., reduction='batchmean')``, the true KL per sample; the
    T^2 keeps gradient magnitudes comparable across temperatures.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * (t * t)


def dkd_per_sample(
    student_logits, teacher_logits, target, alpha: float, beta: float, temperature: float
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) per sample: ``alpha * TCKD + beta * NCKD``, times T^2.

    TCKD is the KL between the binary (target, non-target) distributions of teacher and student;
    NCKD the KL between their distributions over the non-target classes. The mean over the batch
    equals mdistiller's ``dkd_loss`` (computed here in log space instead of log(softmax), and with
    the target class masked out exactly instead of by subtracting 1000 from its logit).
    """
    t = temperature
    s, tt = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(target, s.shape[1]).bool()

    def binary(z):  # log p(target), log p(non-target)
        log_all = torch.logsumexp(z, 1)
        log_gt = z.masked_fill(~gt, float("-inf")).logsumexp(1) - log_all
        log_other = z.masked_fill(gt, float("-inf")).logsumexp(1) - log_all
        return torch.stack([log_gt, log_other], 1)

    b_s, b_t = binary(s), binary(tt)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    log_q_s = F.log_softmax(s.masked_fill(gt, float("-inf")), 1)
    log_q_t = F.log_softmax(tt.masked_fill(gt, float("-inf")), 1)
    nckd = torch.where(gt, 0.0, log_q_t.exp() * (log_q_t - log_q_s)).sum(1)
    return (alpha * tckd + beta * nckd) * (t * t)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if weights is None else (values * weights).mean()


class CrossEntropy(Term):
    """Cross-entropy with the labels. With ``dataset.balance=class_weights`` each sample is weighted
    by its class (``F.cross_entropy(weight=...)``), the weights coming from the data set at bind."""

    needs_teacher = False
    task_loss = True  # DOT's task gradient (distill_runner.train.optimizers)

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ConfigError("label_smoothing", label_smoothing, "use a number in [0, 1), e.g. 0.1")
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("class_weights", None, persistent=False)

    def bind(self, student, teacher, data, key):
        if data.class_weights is not None:
            self.class_weights = torch.as_tensor(data.class_weights, dtype=torch.float32)

    def forward(self, batch, student, teacher, state: TermState):
        logits = student["logits"].float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits, batch["target"], weight=weight, label_smoothing=self.label_smoothing)


def _check_flag(logit_standardization) -> bool:
    if not isinstance(logit_standardization, bool):
        raise ConfigError("logit_standardization", logit_standardization, "use true or false")
    return logit_standardization


class HintonKD(Term):
    """Hinton KD at the recipe's temperature, per-sample weighted when the recipe says so.

    ``logit_standardization=True`` z-scores student and teacher logits with :func:`standardize`
    before the temperature (KD+LS, Sun et al., CVPR 2024; their CIFAR-100 run: T 2, KD weight 9).
    """

    hyperparameters = ("temperature",)
    weighs_samples = True

    def __init__(self, logit_standardization: bool = False):
        super().__init__()
        self.logit_standardization = _check_flag(logit_standardization)

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"], teacher["logits"]
        if self.logit_standardization:
            s, t = standardize(s), standardize(t)
        values = kd_per_sample(s, t, state.temperature)
        return weighted_mean(values, state.sample_weights)


class DecoupledKD(Term):
    """Decoupled KD with the recipe's alpha (TCKD), beta (NCKD) and temperature.

    ``logit_standardization=True`` z-scores student and teacher logits with :func:`standardize`
    before the temperature (DKD+LS, Sun et al., CVPR 2024; their CIFAR-100 run: T 2, KD weight 9).
    """

    hyperparameters = ("temperature", "alpha", "beta")
    weighs_samples = True

    def __init__(self, logit_standardization: bool = False):
        super().__init__()
        self.logit_standardization = _check_flag(logit_standardization)

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"], teacher["logits"]
        if self.logit_standardization:
            s, t = standardize(s), standardize(t)
        values = dkd_per_sample(s, t, batch["target"], state.alpha, state.beta, state.temperature)
        return weighted_mean(values, state.sample_weights)
