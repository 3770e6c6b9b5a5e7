"""Checks on a stage's epoch history that catch a run that trains but does not learn.

Docs: docs/guide/resume-and-faults.md
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

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


# A stage's mean training loss above this, or this many times its first epoch's, has diverged (a cross-entropy
# starts near ln(classes); KD terms scaled by T^2 stay within a few hundred).
DIVERGED_LOSS = 1e4
DIVERGED_RISE = 100


def lr_key(stage: str) -> str:
    """The config key of a stage's learning rate: students train with trainer.*, teachers with their node."""
    return "trainer.optimizer.lr" if stage in ("student", "baseline") else f"{stage}.optimizer.lr"


def divergence_check(history: list[dict], stage: str) -> str | None:
    """The warning text when the training loss has exploded (finite, so the NaN guard let it through)."""
    losses = [h["loss/total"] for h in history if "loss/total" in h]
    if not losses:
        return None
    first, last = losses[0], losses[-1]
    if last < DIVERGED_LOSS and not (len(losses) > 1 and first > 0 and last > DIVERGED_RISE * first):
        return None
    return (f"{stage}: training diverged: the loss is {last:.3g} after {len(losses)} epoch(s) (first {first:.3g}); "
            f"its results mean nothing. Lower the learning rate, e.g. {lr_key(stage)} ten times smaller")  # fmt: skip


def chance(counts: list[int] | None, num_classes: int) -> float:
    """Chance accuracy on a split: the largest class's share (always predicting it), at least 1/classes."""
    total = sum(counts or [])
    return max(max(counts) / total if total else 0.0, 1 / max(num_classes, 1))


def teacher_check(stage: str, val_acc: float | None, val_counts: list[int] | None, num_classes: int) -> str | None:
    """The warning text when a teacher's validation accuracy is at chance: distilling from it teaches nothing."""
    if val_acc is None or val_acc != val_acc or num_classes < 2:
        return None
    level = chance(val_counts, num_classes)
    if val_acc > level + CHANCE_MARGIN:
        return None
    return (f"{stage}: the teacher is at chance (validation accuracy {val_acc:.3f}, chance {level:.3f}): the student "
            f"is distilled from a teacher that predicts nothing. Train it longer ({stage}.epochs), check "
            f"{stage}.label_smoothing and {lr_key(stage)}, or give a trained {stage}.checkpoint")  # fmt: skip


def eta(stage: str, finished: int, epochs: int, epoch_s: float) -> str | None:
    """After a stage's first epoch of this process (``finished`` epochs finished, the last took ``epoch_s``): how long
    the rest will take at that pace. None when nothing is left."""
    if finished >= epochs:
        return None
    left = epochs - finished
    return f"{stage}: ETA about {duration(left * epoch_s)} for the {left} epoch(s) left (at the last epoch's pace)"


def duration(seconds: float) -> str:
    """3 s, 4.2 min, 5.1 h, 3.4 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


class RunEstimate:
    """An epoch hook for the run's first teacher: after its first epoch in this process, logs an estimate of the
    rest of the run (the teacher's remaining epochs at that pace; the KD student and the baseline at it scaled by
    ``relative``, the student's MACs over the teacher's; the teacher's forward passes for KD at a third of a
    training epoch each: once when its outputs are replayed, every student epoch when online)."""

    def __init__(self, teacher_epochs: int, student_epochs: int, relative: float, online: bool):
        self.teacher_epochs, self.student_epochs = teacher_epochs, student_epochs
        self.relative, self.online, self.said = relative, online, False

    def __call__(self, epoch: int, record: dict, model) -> None:
        if not self.said and record.get("epoch_time_s") is not None:
            self.said = True
            log.info(self.text(record["epoch_time_s"], self.teacher_epochs - epoch - 1))

    def text(self, epoch_s: float, teacher_left: int) -> str:
        students = 2 * self.student_epochs * epoch_s * self.relative
        signal = epoch_s / 3 * (self.student_epochs if self.online else 1)
        total = teacher_left * epoch_s + students + signal
        return (f"run estimate: about {duration(total)} more (teacher {teacher_left} epoch(s) x {duration(epoch_s)}; "
                f"student and baseline {self.student_epochs} epoch(s) each at {self.relative:.2g}x the teacher's "
                "cost by MACs; the teacher's outputs for KD). A rough estimate, low for small students (their epochs "
                "cost more than their MACs say): each stage logs its own ETA after its first epoch")  # fmt: skip


class StageWarnings:
    """The at-chance and the divergence warnings of a stage: each logged once."""

    def __init__(self, stage: str):
        self.stage, self.at_chance_said, self.diverged_said = stage, False, False

    def check(self, history: list[dict], model: nn.Module) -> None:
        if not self.at_chance_said and (warning := learning_check(history, class_count(model), self.stage)):
            log.warning(warning)
            self.at_chance_said = True
        if not self.diverged_said and (warning := divergence_check(history, self.stage)):
            log.warning(warning)
            self.diverged_said = True
