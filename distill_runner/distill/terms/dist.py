"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher").

With a much stronger teacher, matching its probabilities exactly (KL) is too strict; DIST only asks
the student's probabilities ``p = softmax(z / T)`` to be linearly correlated with the teacher's:

    loss = T^2 * (beta * inter + gamma * intra)
    inter = 1 - mean over samples of pearson(p_s[i, :], p_t[i, :])   (relations between classes)
    intra = 1 - mean over classes of pearson(p_s[:, c], p_t[:, c])   (relations between samples)

The intra-class relation couples the samples of a batch, so the loss is not a mean over samples and
per-sample weights do not apply to it.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

import torch

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.logits import standardize
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number

EPS = 1e-8  # added to the product of the norms, as the official code does: a constant vector correlates 0


def pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``1 - mean Pearson correlation`` of ``a`` and ``b`` along ``dim`` (averaged over the other dim)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    correlation = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + EPS)
    return 1 - correlation.mean()


def dist_loss(student_logits, teacher_logits, temperature: float, beta: float, gamma: float) -> torch.Tensor:
    """DIST at temperature ``T``: ``T^2 * (beta * inter-class + gamma * intra-class)`` relation distance."""
    p_s = (student_logits.float() / temperature).softmax(1)
    p_t = (teacher_logits.float() / temperature).softmax(1)
    inter = pearson_distance(p_s, p_t, dim=1)  # each sample: its classes
    intra = pearson_distance(p_s, p_t, dim=0)  # each class: the batch's samples
    return (beta * inter + gamma * intra) * temperature**2


def _check_weight(key: str, value) -> float:
    if not is_number(value) or value < 0:
        raise ConfigError(key, value, "must be a finite number >= 0 (the paper uses 1.0)")
    return float(value)


class DIST(Term):
    """DIST with its softmax temperature from the recipe (``temperature``; official: 4 on CIFAR-100,
    1 on ImageNet) and its own weights ``beta`` (inter-class) and ``gamma`` (intra-class); this
    ``beta`` is the term's own key (``terms.<name>.beta``), not the recipe's DKD ``beta``.

    A batch of one sample has no intra-class relation: each class's column is constant, its
    correlation 0 (as in the official code, which divides by ``norms + 1e-8``), so that part is the
    constant ``gamma * T^2`` with no gradient; the inter-class part still trains.

    ``logit_standardization`` z-scores both logits before the temperature (Sun et al., CVPR 2024);
    the LS paper's code does not apply it to DIST, so this is an option of ours, off by default.
    """

    hyperparameters = ("temperature",)

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, logit_standardization: bool = False):
        super().__init__()
        self.beta, self.gamma = _check_weight("beta", beta), _check_weight("gamma", gamma)
        if self.beta == 0 and self.gamma == 0:
            raise ConfigError("gamma", gamma, "beta and gamma are both 0, the loss would be 0: set one > 0, e.g. 1.0")
        if not isinstance(logit_standardization, bool):
            raise ConfigError("logit_standardization", logit_standardization, "use true or false")
        self.logit_standardization = logit_standardization

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"], teacher["logits"]
        if self.logit_standardization:
            s, t = standardize(s), standardize(t)
        return dist_loss(s, t, state.temperature, self.beta, self.gamma)
