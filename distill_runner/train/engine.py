"""One training loop for every stage, evaluation, mixed precision and atomic checkpoints.

Docs: docs/architecture.md
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_runner import distributed
from distill_runner.data.batches import Batches
from distill_runner.distill.contract import strong_augment
from distill_runner.errors import ConfigError
from distill_runner.models.features import FeatureTap
from distill_runner.precision import PRECISIONS as PRECISIONS  # the loop's settings, named here too (engine.X)
from distill_runner.precision import Precision
from distill_runner.precision import resolve_device as resolve_device
from distill_runner.precision import resolve_precision as resolve_precision
from distill_runner.train.epoch_losses import SYNC_EVERY, EpochLosses  # noqa: F401 (SYNC_EVERY: as before)
from distill_runner.train.health import StageWarnings, eta
from distill_runner.train.optimizers import backward_split
from distill_runner.train.resume import StageCheckpoints

if TYPE_CHECKING:
    from distill_runner.distill.contract import TeacherSignal
    from distill_runner.distill.recipe import Recipe

log = logging.getLogger(__name__)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_factor: float = 0.0,
):
    """Per-step LR factor: linear warm-up, then cosine decay to ``min_factor`` of the base LR."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def multistep(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
):
    """Per-step LR factor: ``gamma`` to the number of ``milestones`` (0-based epoch indices) reached, as
    MultiStepLR stepped per epoch (the CIFAR benchmarks: x0.1 from epochs 150, 180, 210 of 240), after an
    optional linear warm-up. Milestones are in epochs; the loop steps the scheduler per batch."""
    milestones = [*milestones]
    if any(not isinstance(m, int) or m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ConfigError("milestones", list(milestones), "give increasing epoch numbers >= 1, e.g. [150, 180, 210]")
    if not 0 < gamma <= 1:
        raise ConfigError("gamma", gamma, "use a decay factor in (0, 1], e.g. 0.1")
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return gamma ** bisect.bisect_right(milestones, step // max(1, steps_per_epoch))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_lr(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


EpochHook = Callable[[int, dict, nn.Module], None]  # Stage.on_epoch


@dataclass
class Stage:
    """What one call of :func:`fit` trains, and how."""

    name: str  # teacher | distill | baseline
    model: nn.Module
    recipe: Recipe  # the loss terms; an nn.Module (adapters and heads train with the model)
    epochs: int
    optimizer: Callable  # partial: params -> Optimizer
    scheduler: Callable  # partial: (optimizer, epochs, steps_per_epoch) -> LR scheduler
    teacher: TeacherSignal | None = None  # online or replayed (distill_runner.distill.signals)
    # Called after each epoch's validation as on_epoch(epoch, record, model), on every process: it may add values to
    # the epoch's record (logged and kept in the history) or raise to stop training (a search pruning a trial).
    on_epoch: EpochHook | None = None


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        for view in {"image", "image_strong"} & set(batch):
            batch[view] = batch[view].contiguous(memory_format=torch.channels_last)
    return batch


@dataclass(frozen=True)
class Speed:
    """Optional ways to run the same training faster (``trainer.channels_last``, ``trainer.compile``)."""

    channels_last: bool = False  # NHWC activations: faster convolutions on tensor cores
    compile: bool | str = False  # torch.compile: true, or a mode such as "max-autotune"

    def apply(self, model: nn.Module) -> nn.Module:
        """The module to call in training steps (``model`` keeps the weights either way)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            return torch.compile(model, **({"mode": self.compile} if isinstance(self.compile, str) else {}))
        return model


def fit(
    stage: Stage,
    train: Iterable,
    val: Iterable,
    device: torch.device,
    precision: Precision,
    *,
    writer=None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    resume: bool = False,
    speed: Speed = Speed(),
) -> list[dict]:
    """Train ``stage.model`` with ``stage.recipe``; validate and checkpoint after every epoch.

    The checkpoint ``<checkpoint_dir>/<stage>_last.pt`` holds everything needed to continue:
    model, recipe modules, optimizer, LR scheduler, gradient scaler, RNG state, epoch and history;
    ``<stage>_best.pt`` the weights of the epoch with the best validation accuracy so far.
    With ``resume``, training continues after the last completed epoch it records; batch order
    and augmentation come from (seed, epoch), so the result equals an uninterrupted run.

    The recipe's parameters (adapters, auxiliary heads) train with the model; its ``set_epoch``
    runs before each epoch and returns the scheduled values to log; the outputs of its
    ``student_layers`` reach it in ``student_outputs["features"]`` (see distill_runner.distill.contract).

    Under torchrun (:mod:`distill_runner.distributed`) the model and a recipe with parameters are
    wrapped in DistributedDataParallel, the loaders are already sharded, logged values are summed
    over the processes and only rank 0 writes checkpoints and TensorBoard (the runner gives the
    other ranks no ``writer``).

    Returns one dict per epoch: mean of each loss term, learning rate, validation accuracy.
    """
    if isinstance(train, Batches):  # a strong view only for the stage whose recipe asks (not a script's own feed)
        train.set_strong(strong_augment(stage.recipe))
    training = Training.build(stage, len(train), device, precision, speed)
    checkpoints = StageCheckpoints(checkpoint_dir, stage.name) if checkpoint_dir is not None else None
    history = resume_training(training, checkpoints) if resume and checkpoints is not None else []
    if not history:  # the terms' stage before training (AB, FT); a resumed stage has its result already
        stage.recipe.prepare(training.model, training.teacher, train, device)
    training.start_steps()
    warnings = StageWarnings(stage.name)
    first = len(history)
    try:
        for epoch in range(first, stage.epochs):
            start = time.perf_counter()
            restart = checkpoints.where_to_restart() if checkpoints is not None else ""
            record = train_one_epoch(training, train, epoch, progress, restart)
            record["val/acc"] = evaluate(training.model, val, device, precision)
            record["epoch_time_s"] = time.perf_counter() - start  # before on_epoch: a run estimate reads it
            if stage.on_epoch is not None:
                stage.on_epoch(epoch, record, training.model)
            history.append(record)
            warnings.check(history, training.model)
            write_scalars(writer, record, epoch + 1)
            if checkpoints is not None:
                checkpoints.save(training.state(epoch + 1, history), history)
            log_epoch(stage, epoch, record, first_of_process=epoch == first)
    finally:
        training.forward.remove()
    return history


@dataclass
class Training:
    """What the steps of a stage share: the model and recipe on the device, the teacher signal (None when the
    recipe needs none), the optimizer with its LR scheduler and gradient scaler, and how a step runs."""

    stage: Stage
    model: nn.Module
    recipe: Recipe
    teacher: TeacherSignal | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: Precision
    speed: Speed
    forward: FeatureTap | None = None  # the step's model call: {"logits", "features"} (set by start_steps)
    step_recipe: nn.Module | None = None  # the step's recipe call, wrapped under torchrun (set by start_steps)

    @classmethod
    def build(cls, stage: Stage, steps_per_epoch: int, device: torch.device, precision: Precision, speed: Speed):
        model = stage.model.to(device)
        recipe = stage.recipe.to(device)
        teacher = stage.teacher.to(device) if recipe.needs_teacher else None
        params = list(model.parameters()) + list(recipe.parameters())
        optimizer = stage.optimizer(params=[p for p in params if p.requires_grad])
        scheduler = stage.scheduler(optimizer, epochs=stage.epochs, steps_per_epoch=steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        return cls(stage, model, recipe, teacher, optimizer, scheduler, scaler, device, precision, speed)

    def start_steps(self) -> None:
        """Wrap the model and the recipe for the training steps (after a resume has loaded their state)."""
        step_model = distributed.wrap(self.speed.apply(self.model), self.device)
        self.step_recipe = distributed.wrap(self.recipe, self.device)
        self.forward = FeatureTap(self.model, self.recipe.student_layers, call=step_model)

    def state(self, epoch: int, history: list[dict]) -> dict:
        """The checkpoint after ``epoch`` epochs: everything needed to continue."""
        return {
            "stage": self.stage.name,
            "epoch": epoch,
            "history": history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "recipe": self.recipe.state_dict(),
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.recipe.load_state_dict(state["recipe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])


def resume_training(training: Training, checkpoints: StageCheckpoints) -> list[dict]:
    """Load the newest good checkpoint into ``training``; the history of the epochs it finished ([] if none)."""
    newest = checkpoints.newest_good()
    if newest is None:
        return []
    state, path = newest
    training.load(state)
    stage = training.stage
    log.info("%s: resuming after epoch %d/%d from %s", stage.name, state["epoch"], stage.epochs, path)
    return state["history"]


def train_one_epoch(training: Training, batches: Iterable, epoch: int, progress: bool, restart: str) -> dict:
    """One pass over ``batches``: the epoch's record of mean loss terms, last LR, scheduled and learned values.
    ``restart`` ends a non-finite-loss error (the last good checkpoint)."""
    stage = training.stage
    batches.set_epoch(epoch)
    training.model.train()
    schedule = training.recipe.set_epoch(epoch, stage.epochs)
    if training.teacher is not None:  # a replayed teacher signal follows the epoch
        training.teacher.set_epoch(epoch)
    bar = tqdm(
        batches,
        desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
        leave=False,
        disable=None if progress and distributed.is_main() else True,  # None: drawn only on a terminal, not logs
        dynamic_ncols=True,
    )
    losses = EpochLosses(f"stage {stage.name}, epoch {epoch + 1}", restart, not training.precision.use_scaler)
    step = -1
    try:
        for step, batch in enumerate(bar):
            train_step(training, batch, losses)
            if losses.window_full:
                losses.check(step, over_processes=True)
                if not bar.disable:
                    bar.set_postfix(loss=f"{losses.running_total():.4f}")
    except FloatingPointError:
        raise
    except Exception:
        losses.check(step, over_processes=False)  # a non-finite step may have caused it: name that first
        raise
    losses.check(step, over_processes=True)  # the epoch's last steps, before its checkpoint
    record = losses.means()
    record["lr"] = training.optimizer.param_groups[0]["lr"]
    record.update({f"schedule/{k}": v for k, v in schedule.items()})
    record.update({f"learned/{k}": v for k, v in training.recipe.logged().items()})  # e.g. CTKD's temperature
    return record


def train_step(training: Training, batch: dict[str, torch.Tensor], losses: EpochLosses) -> None:
    """Forward, loss terms, backward, optimizer and LR-scheduler step on one batch; its losses go to ``losses``."""
    batch = to_device(batch, training.device, training.speed.channels_last)
    with training.precision.autocast():
        student_out = training.forward(batch["image"])
        if "image_strong" in batch:  # the recipe asked for the strong view (a forward pass of its own, as CRLD's)
            student_out["strong_logits"] = training.forward(batch["image_strong"])["logits"]
        teacher_out = training.teacher(batch) if training.teacher is not None else None
        terms = training.step_recipe(batch, student_out, teacher_out)
    loss = sum(terms.values())
    values = losses.values(terms, loss)
    if getattr(training.optimizer, "splits_losses", False):  # DOT: the task and distillation gradients apart
        task_terms = training.recipe.task_terms
        task = [v for name, v in terms.items() if name in task_terms]
        backward_split(training.optimizer, task, [v for name, v in terms.items() if name not in task_terms])
    else:
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.scheduler.step()
    losses.add(values, len(batch["target"]))


def evaluate(model: nn.Module, val: Iterable, device: torch.device, precision: Precision) -> float:
    """Validation accuracy over the samples of all processes."""
    return accuracy(*predict(model, val, device, precision), over_processes=True)


def write_scalars(writer, record: dict, step: int) -> None:
    if writer is None:  # the runner gives ranks > 0 none
        return
    for k, v in record.items():
        writer.add_scalar(k, v, step)
    writer.flush()


def log_epoch(stage: Stage, epoch: int, record: dict, first_of_process: bool) -> None:
    """The epoch's line; after the first epoch this process trains, the stage's ETA."""
    losses = " ".join(f"{k.removeprefix('loss/')}={v:.4f}" for k, v in record.items() if k.startswith("loss/"))
    values = (stage.name, epoch + 1, stage.epochs, losses, record["lr"], record["val/acc"], record["epoch_time_s"])
    log.info("%s epoch %d/%d  %s  lr=%.3g  val_acc=%.4f  (%.1fs)", *values)
    line = eta(stage.name, epoch + 1, stage.epochs, record["epoch_time_s"]) if first_of_process else None
    if line and distributed.is_main():
        log.info(line)


@torch.inference_mode()
def predict(
    model: nn.Module, loader: Iterable, device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on CPU) and targets for a whole split."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for batch in loader:
        with precision.autocast():
            out = model(batch["image"].to(device, non_blocking=True))
        logits.append(out.float())  # kept on the device: one read at the end, not one per batch
        targets.append(batch["target"])
    model.train(was_training)
    if not logits:  # an empty split
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(targets)


def accuracy(logits: torch.Tensor, targets: torch.Tensor, over_processes: bool = False) -> float:
    """Top-1 accuracy; ``over_processes``: of the samples of all processes (each predicted its shard)."""
    counts = torch.tensor(
        [(logits.argmax(1) == targets).sum().item() if len(targets) else 0, len(targets)], dtype=torch.float64
    )
    if over_processes:
        counts = distributed.sum_over_processes(counts)
    return (counts[0] / counts[1]).item() if counts[1] else float("nan")
