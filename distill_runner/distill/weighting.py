"""Per-sample weights a recipe applies to its per-sample terms (KD, DKD): class balance for
long-tailed data and the teacher's confidence.

Docs: docs/methods/logit.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distill_runner.errors import ConfigError

CLASS_BALANCE = ("inverse_frequency", "effective_number")
SAMPLE_WEIGHTING = ("teacher_confidence",)


def class_balance_weights(counts: Sequence[int], method: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class weights from training class counts, normalized to sum to the number of classes.

    ``inverse_frequency``: w_c ~ 1 / n_c. ``effective_number`` (Cui et al., CVPR 2019):
    w_c ~ (1 - beta) / (1 - beta^n_c). Classes with no training samples get weight 0.
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    present = n > 0
    if method == "inverse_frequency":
        w = torch.where(present, 1.0 / n.clamp_min(1), 0.0)
    elif method == "effective_number":
        w = torch.where(present, (1 - beta) / (1 - beta ** n.clamp_min(1)), 0.0)
    else:
        raise ConfigError("class_balance", method, f"use null, {' or '.join(CLASS_BALANCE)}")
    return (w * present.sum() / w.sum()).float()


def teacher_confidence_weights(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample weights: the teacher's probability of the true class (T=1), scaled to mean 1."""
    conf = F.softmax(teacher_logits.float(), 1).gather(1, target[:, None]).squeeze(1)
    return conf / conf.mean().clamp_min(1e-12)
