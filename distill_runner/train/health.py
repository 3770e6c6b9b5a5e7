"""Checks on a stage's epoch history that catch a run that trains but does not learn."""

from __future__ import annotations

from torch import nn

# How far above chance the validation accuracy may be and still count as "at chance".
CHANCE_MARGIN = 0.05
# The relative fall of the training loss that shows the model fits the training data.
LOSS_FALL = 0.3

# Stages that train the student (their config keys live under student.*); teachers' stages are named by their key.
STUDENT_STAGES = ("distill", "baseline")


def learning_check(history: list[dict], num_classes: int, stage: str, majority: float | None = None) -> str | None:
    """The warning text when the training loss has fallen clearly while validation accuracy stays at chance.

    ``history`` is :func:`distill_runner.train.engine.fit`'s: one dict per epoch with ``loss/total``
    and ``val/acc``. Chance is ``1 / num_classes``, or ``majority`` (the largest class's share of
    the validation split) when that is higher. Needs at least 2 epochs; None when all is well.
    """
    if len(history) < 2 or num_classes < 2:
        return None
    first, last = history[0]["loss/total"], history[-1]["loss/total"]
    accuracies = [h["val/acc"] for h in history if h["val/acc"] == h["val/acc"]]  # NaN: empty validation split
    if not accuracies or not first > 0 or last > (1 - LOSS_FALL) * first:
        return None
    chance = max(1 / num_classes, majority or 0.0)
    best = max(accuracies)
    if best > chance + CHANCE_MARGIN:
        return None
    key = "student" if stage in STUDENT_STAGES else stage
    return (
        f"{stage}: validation accuracy stays at chance (best {best:.3f}, chance {chance:.3f} with {num_classes} "
        f"classes) after {len(history)} epochs while the training loss fell {1 - last / first:.0%} "
        f"({first:.3g} -> {last:.3g}): the model fits the training batches but predicts no better than chance in "
        f"eval mode. Likely cause: BatchNorm running statistics that do not follow the data (e.g. BN momentum 0.01 "
        f"in torchvision MobileNetV3 with a short schedule): try {key}.model.bn_momentum=0.1 or more epochs; "
        f"or a bug in eval-mode layers."
    )


def class_count(model: nn.Module) -> int:
    """The class count of a classifier: the width of its last Linear layer (0 when it has none: no check)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0
