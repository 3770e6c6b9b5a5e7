"""What one trial of a search runs: the distill-run pipeline's own functions (:func:`runner.session
<distill_runner.runner.session>`, :func:`~distill_runner.runner.build`, :func:`~distill_runner.runner.train`
up to the KD student) on the config composed with the trial's overrides, without the scratch baseline,
evaluation or report; and the student's measured cost. The teacher comes from the shared cache, so it
is trained once per search (:func:`prepare_teacher`) and its outputs are replayed in every trial.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from distill_runner import runner
from distill_runner.data.bundle import DataBundle
from distill_runner.evaluation import metrics as measure
from distill_runner.models.factories import count_parameters
from distill_runner.spec import EvalSpec, RunSpec
from distill_runner.train import engine

log = logging.getLogger(__name__)

COSTS = ("latency_ms", "macs", "params")  # what a student costs, as search.objective and search.budget name it


def cost(model: nn.Module, data: DataBundle, device: torch.device, precision, timing: EvalSpec) -> dict:
    """Batch-1 latency (median, ms; why it is not to be trusted when measured under contention), MACs per
    image and parameters of ``model``: what budgets limit."""
    shape = (data.in_channels, data.image_size, data.image_size)
    latency = measure.latency(
        model, shape, device, precision, threads=timing.latency_threads, budget_s=timing.latency_budget_s
    )
    return {
        "latency_ms": latency.seconds * 1e3,
        "latency_contention": latency.contention,
        "macs": measure.flops_per_image(model, shape, device) // 2,
        "params": count_parameters(model),
    }


def val_accuracy(model: nn.Module, ctx) -> float:
    return engine.accuracy(*engine.predict(model, ctx.data.val, ctx.device, ctx.precision))


def prepare_teacher(cfg: DictConfig | RunSpec, run_dir: Path) -> dict | None:
    """Fine-tune the teacher once (or reuse it from the cache) before the trials, and measure it for
    the report: validation accuracy and cost. None when the configured recipe trains no teacher."""
    with runner.session(cfg, run_dir) as ctx:  # validated once: the recipe is built there, once
        built = runner.build(ctx)
        teachers, _ = runner.train(ctx, built, stages=("teachers",))
        if "teacher" not in teachers:
            return None
        teacher = teachers["teacher"]
        return {
            "val_acc": val_accuracy(teacher, ctx),
            **cost(teacher, ctx.data, ctx.device, ctx.precision, ctx.spec.eval),
        }


def run_trial(
    cfg: DictConfig | RunSpec, run_dir: Path, measured: Callable[[dict], None], on_epoch: engine.EpochHook
) -> float:
    """Train the KD student of ``cfg`` into ``run_dir``; return its final validation accuracy.

    ``measured(cost)`` is called with the student's cost before training (so a pruned trial has one
    too: the sampler learns the budgets from every trial); ``on_epoch`` may stop training (pruning).
    """
    with runner.session(cfg, run_dir) as ctx:
        built = runner.build(ctx)
        measured(cost(built.recipe.deployed(built.student), ctx.data, ctx.device, ctx.precision, ctx.spec.eval))
        _, results = runner.train(ctx, built, stages=("teachers", "student"), on_student_epoch=on_epoch)
        return results["student"].final_val_acc
