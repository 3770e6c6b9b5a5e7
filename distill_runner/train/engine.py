"""One training loop for every stage, evaluation, mixed precision and atomic checkpoints."""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_runner import distributed
from distill_runner.errors import ConfigError
from distill_runner.models.features import FeatureTap
from distill_runner.precision import PRECISIONS as PRECISIONS  # the loop's settings, named here too (engine.X)
from distill_runner.precision import Precision
from distill_runner.precision import resolve_device as resolve_device
from distill_runner.precision import resolve_precision as resolve_precision
from distill_runner.storage import keep_previous, save_verified
from distill_runner.train.health import class_count, divergence_check, eta, learning_check
from distill_runner.train.resume import previous_checkpoint, resume_state

if TYPE_CHECKING:
    from distill_runner.distill.contract import TeacherSignal
    from distill_runner.distill.recipe import Recipe

log = logging.getLogger(__name__)

# Training steps between reads of the device (the non-finite check and the progress bar's running loss). Each read
# waits for all queued kernels, so reading every step would leave a GPU idle while Python prepares the next batch.
SYNC_EVERY = 25


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
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
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
    over the processes and only rank 0 writes checkpoints and TensorBoard.

    Returns one dict per epoch: mean of each loss term, learning rate, validation accuracy.
    """
    model = stage.model.to(device)
    recipe = stage.recipe.to(device)
    teacher = stage.teacher.to(device) if recipe.needs_teacher else None
    params = list(model.parameters()) + list(recipe.parameters())
    optimizer = stage.optimizer(params=[p for p in params if p.requires_grad])
    scheduler = stage.scheduler(optimizer, epochs=stage.epochs, steps_per_epoch=len(train))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    history: list[dict] = []
    last = Path(checkpoint_dir) / f"{stage.name}_last.pt" if checkpoint_dir is not None else None
    found = resume_state(last, stage.name) if resume and last is not None else None
    if found is not None:
        state, last_good = found
        model.load_state_dict(state["model"])
        recipe.load_state_dict(state["recipe"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        history = state["history"]
        log.info("%s: resuming after epoch %d/%d from %s", stage.name, state["epoch"], stage.epochs, last_good)
    step_model = distributed.wrap(speed.apply(model), device)
    step_recipe = distributed.wrap(recipe, device)
    forward = FeatureTap(model, recipe.student_layers, call=step_model)  # {"logits", "features"}
    main = distributed.is_main()
    warned = diverged = False  # the at-chance and divergence warnings: once per stage
    first = len(history)
    try:
        for epoch in range(first, stage.epochs):
            start = time.perf_counter()
            train.set_epoch(epoch)
            model.train()
            schedule = recipe.set_epoch(epoch, stage.epochs)
            if teacher is not None:  # a replayed teacher signal follows the epoch
                teacher.set_epoch(epoch)
            names: list[str] = []  # the loss terms, in the recipe's order
            acc = None  # per term, then the total: sum of loss x batch size (float64, on the device)
            window: list[torch.Tensor] = []  # [terms..., total] of the steps not yet checked for non-finite values
            seen = 0
            bar = tqdm(
                train,
                desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
                leave=False,
                disable=None if progress and main else True,  # None: drawn only on a terminal, not into logs
                dynamic_ncols=True,
            )
            where = f"; the last good checkpoint is {last}" if last is not None and last.is_file() else ""
            guard = partial(_guard, names, f"stage {stage.name}, epoch {epoch + 1}", where, not precision.use_scaler)
            step = -1
            try:
                for step, batch in enumerate(bar):
                    batch = to_device(batch, device, speed.channels_last)
                    with precision.autocast():
                        student_out = forward(batch["image"])
                        teacher_out = teacher(batch) if teacher is not None else None
                        terms = step_recipe(batch, student_out, teacher_out)
                    loss = sum(terms.values())
                    if not names:  # filled in place: the guard holds this list
                        names.extend(terms)
                    values = torch.stack([*(terms[k] for k in names), loss]).detach().double()
                    window.append(values)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    n = len(batch["target"])
                    seen += n
                    acc = values * n if acc is None else acc.add_(values, alpha=n)
                    if len(window) == SYNC_EVERY:
                        guard(window, step, over_processes=True)
                        window = []
                        if not bar.disable:
                            bar.set_postfix(loss=f"{acc[-1].item() / seen:.4f}")
            except FloatingPointError:
                raise
            except Exception:
                guard(window, step, over_processes=False)  # a non-finite step may have caused it: name that first
                raise
            guard(window, step, over_processes=True)  # the epoch's last steps, before its checkpoint
            sums = dict(zip([*names, "total"], acc.tolist())) if acc is not None else {}  # the epoch's one read
            totals = distributed.sum_over_processes(torch.tensor([*sums.values(), seen], dtype=torch.float64)).tolist()
            record = {f"loss/{k}": v / totals[-1] for k, v in zip(sums, totals)}
            record["lr"] = optimizer.param_groups[0]["lr"]
            record.update({f"schedule/{k}": v for k, v in schedule.items()})
            record.update({f"learned/{k}": v for k, v in recipe.logged().items()})  # e.g. CTKD's temperature
            record["val/acc"] = accuracy(*predict(model, val, device, precision), over_processes=True)
            record["epoch_time_s"] = time.perf_counter() - start  # before on_epoch: a run estimate reads it
            if stage.on_epoch is not None:
                stage.on_epoch(epoch, record, model)
            history.append(record)
            if not warned and (warning := learning_check(history, class_count(model), stage.name)):
                log.warning(warning)
                warned = True
            if not diverged and (warning := divergence_check(history, stage.name)):
                log.warning(warning)
                diverged = True
            if writer is not None:  # the runner gives ranks > 0 none
                for k, v in record.items():
                    writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            if last is not None:
                state = {
                    "stage": stage.name,
                    "epoch": epoch + 1,
                    "history": history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "recipe": recipe.state_dict(),
                }
                keep_previous(last, previous_checkpoint(last))  # a damaged _last.pt falls back on it
                save_verified(state, last)
                if record["val/acc"] >= max(h["val/acc"] for h in history):  # the best epoch so far (ties: the later)
                    save_verified(
                        {"model": model.state_dict(), "epoch": epoch + 1, "val_acc": record["val/acc"]},
                        last.with_name(f"{stage.name}_best.pt"),
                    )
            losses = " ".join(f"{k.removeprefix('loss/')}={v:.4f}" for k, v in record.items() if k.startswith("loss/"))
            log.info(
                "%s epoch %d/%d  %s  lr=%.3g  val_acc=%.4f  (%.1fs)",
                stage.name,
                epoch + 1,
                stage.epochs,
                losses,
                record["lr"],
                record["val/acc"],
                record["epoch_time_s"],
            )
            if epoch == first and main and (line := eta(stage.name, epoch + 1, stage.epochs, record["epoch_time_s"])):
                log.info(line)
    finally:
        forward.remove()
    return history


def _guard(names: list[str], place: str, checkpoint: str, on: bool, window: list, step: int, over_processes: bool):
    """Raise FloatingPointError naming the first of the ``window`` steps (the last ends at ``step``) whose loss
    is not finite, here or, with ``over_processes`` under torchrun, in any process (so that all of them stop
    together instead of leaving the others waiting in the next gradient all-reduce). One read of the device.

    The check runs every SYNC_EVERY steps, so the optimizer has taken the steps after the bad one; only the
    checkpoint of the epoch's start is good (no checkpoint is written before the epoch's last steps are checked).
    ``on`` is False under fp16 (the gradient scaler skips steps with non-finite gradients itself)."""
    if not on or not window:
        return
    rows = torch.stack(window)
    bad = (~torch.isfinite(rows).all(1)).double().cpu()
    bad = distributed.sum_over_processes(bad) if over_processes else bad
    if not bad.any():
        return
    first = int(bad.nonzero()[0, 0])
    values = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, rows[first].tolist()))
    raise FloatingPointError(
        f"non-finite loss in {place}, batch {step + 1 - len(window) + first}: {values}{checkpoint}"
    )


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
