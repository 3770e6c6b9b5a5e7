"""Curriculum Temperature KD (Li et al., AAAI 2023): Hinton KD at a learned temperature that the
student's own optimizer pushes towards the *hardest* temperature, more so as training goes on.

    T = t_min + t_range * sigmoid(p)            p: one learnable number (the global version)
    loss = T^2 * KL(softmax(t/T) || softmax(s/T))   [mean over samples]

``p`` reaches ``T`` through a gradient-reversal layer: the forward pass is the identity, the backward
pass multiplies the gradient by ``-lambda``. So the optimizer that lowers the loss for the student
raises it w.r.t. ``p``, scaled by the curriculum ``lambda``, which rises along a cosine from
``lambda_start`` to ``lambda_end`` over the first ``lambda_ramp`` of training and then holds
(easy-to-hard). The instance-wise version (a temperature per sample from an MLP) is not offered.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

import torch

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.schedules import Schedule
from distill_runner.distill.terms.logits import kd_per_sample, standardize, weighted_mean
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-scale`` (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class CTKD(Term):
    """Hinton KD at a learned global temperature, trained adversarially under a cosine curriculum.

    Official settings (zhengli97/CTKD, CIFAR-100 and ImageNet scripts): ``T = 1 + 20 * sigmoid(p)``
    (``--t_start 1 --t_end 20``), ``p`` starts at 1 (T = 15.6), lambda from 0 to 1 over 10 of 240
    epochs on CIFAR-100 (5 of 120 on ImageNet; ``--decay_max 0 --decay_min -1 --decay_loops``), both
    1/24 of training, hence ``lambda_ramp = 10/240``. Official epoch ``i`` (1-based) is our epoch
    ``i - 1``: lambda(e) = lambda_start + (lambda_end - lambda_start) * (1 - cos(pi * p)) / 2 with
    p = min(1, (e + 1) / (lambda_ramp * epochs)), which equals the official ``CosineDecay`` at
    240 epochs and scales with shorter runs. ``p`` is a parameter of this term, so it trains in the
    student's optimizer with its learning rate and weight decay, as in the official code (one SGD for both).

    ``logit_standardization`` z-scores both logits before the temperature, as the LS paper's CTKD
    code does (sunshangquan/logit-standardization-KD, CTKD/distiller_zoo/KD.py).
    """

    weighs_samples = True

    def __init__(
        self,
        t_min: float = 1.0,
        t_range: float = 20.0,
        lambda_start: float = 0.0,
        lambda_end: float = 1.0,
        lambda_ramp: float = 10 / 240,
        logit_standardization: bool = False,
    ):
        super().__init__()
        if not is_number(t_min) or not t_min > 0:
            raise ConfigError("t_min", t_min, "use a number > 0: the lowest temperature, e.g. 1 (official --t_start)")
        if not is_number(t_range) or not t_range > 0:
            raise ConfigError("t_range", t_range, "use a number > 0: T = t_min + t_range * sigmoid(p), e.g. 20")
        for key, value in (("lambda_start", lambda_start), ("lambda_end", lambda_end)):
            if not is_number(value) or value < 0:
                fix = "use a number >= 0: the strength of the reversed gradient on the temperature (official 0 -> 1)"
                raise ConfigError(key, value, fix)
        if not is_number(lambda_ramp) or not 0 < lambda_ramp <= 1:
            fix = "use a fraction of training in (0, 1]: the cosine rise of lambda, e.g. 0.0417 (10 of 240 epochs)"
            raise ConfigError("lambda_ramp", lambda_ramp, fix)
        if not isinstance(logit_standardization, bool):
            raise ConfigError("logit_standardization", logit_standardization, "use true or false")
        self.t_min, self.t_range = float(t_min), float(t_range)
        self.lambda_end = float(lambda_end)
        self.curriculum = Schedule("cosine", float(lambda_start), float(lambda_ramp))
        self.logit_standardization = logit_standardization
        self.temperature_parameter = torch.nn.Parameter(torch.ones(()))  # official init: ones(1)

    def reversal(self, epoch: int, epochs: int) -> float:
        """The curriculum lambda at 0-based ``epoch`` of ``epochs``."""
        return self.curriculum.value(self.lambda_end, epoch, epochs)

    def temperature(self, parameter: torch.Tensor | None = None) -> torch.Tensor:
        p = self.temperature_parameter if parameter is None else parameter
        return self.t_min + self.t_range * torch.sigmoid(p.float())

    def logged(self) -> dict[str, float]:
        """The learned temperature, for the epoch log."""
        return {"temperature": self.temperature().item()}

    def forward(self, batch, student, teacher, state: TermState):
        s, t = student["logits"].float(), teacher["logits"].float()
        if self.logit_standardization:
            s, t = standardize(s), standardize(t)
        scale = self.reversal(state.epoch, state.epochs)
        temperature = self.temperature(_ReverseGradient.apply(self.temperature_parameter, scale))
        return weighted_mean(kd_per_sample(s, t, temperature), state.sample_weights)
