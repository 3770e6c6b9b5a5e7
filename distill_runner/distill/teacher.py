"""Teacher signals: what the distillation loop gets from the teacher for a batch.

A teacher signal is a callable ``batch -> {"logits": ..., "features": {layer: tensor}}`` (features
only when a recipe names teacher layers), placed on the device with ``to``. The online signal runs
the frozen teacher on the same (augmented) batch as the student; several teachers are combined by
a weighted average of their logits (features come from the first, the run's ``teacher``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill_runner.distill.losses import Batch, Outputs
from distill_runner.models.features import FeatureTap


class OnlineTeacher:
    """The frozen teacher's forward pass on each training batch (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] = ()):
        self.model = model
        self.tap = FeatureTap(model, layers)

    def to(self, device: torch.device) -> OnlineTeacher:
        self.model.to(device).eval()
        return self

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's graph
    def __call__(self, batch: Batch) -> Outputs:
        return self.tap(batch["image"])


class EnsembleTeacher:
    """Several frozen teachers: ``logits = sum_i w_i * logits_i / sum_i w_i`` (equal weights by default)."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None, layers: Sequence[str] = ()):
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        assert len(weights) == len(models) and sum(weights) > 0
        self.teachers = [OnlineTeacher(m, layers if i == 0 else ()) for i, m in enumerate(models)]
        self.weights = [w / sum(weights) for w in weights]

    def to(self, device: torch.device) -> EnsembleTeacher:
        for t in self.teachers:
            t.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Outputs:
        outs = [t(batch) for t, w in zip(self.teachers, self.weights) if w > 0 or t is self.teachers[0]]
        weights = [w for t, w in zip(self.teachers, self.weights) if w > 0 or t is self.teachers[0]]
        out = dict(outs[0])
        out["logits"] = sum(w * o["logits"].float() for w, o in zip(weights, outs))
        return out


def teacher_signal(models: Sequence[nn.Module], weights: Sequence[float] | None = None, layers: Sequence[str] = ()):
    """The online signal for one teacher, or the weighted ensemble of several."""
    if len(models) == 1:
        return OnlineTeacher(models[0], layers)
    return EnsembleTeacher(models, weights, layers)
