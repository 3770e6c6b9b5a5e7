"""Teacher signals: what the distillation loop gets from the teacher for a batch.

A teacher signal is a callable ``batch -> {"logits": ...}``, placed on the device with ``to``.
The online signal runs the frozen teacher on the same (augmented) batch as the student.
"""

from __future__ import annotations

import torch
from torch import nn

from distill_runner.losses import Batch, Outputs


class OnlineTeacher:
    """The frozen teacher's forward pass on each training batch (eval mode, no gradients)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def to(self, device: torch.device) -> "OnlineTeacher":
        self.model.to(device).eval()
        return self

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's graph
    def __call__(self, batch: Batch) -> Outputs:
        return {"logits": self.model(batch["image"])}
