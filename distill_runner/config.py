"""Config validation, once, before any work: the composed config checked against the typed schema
(:mod:`distill_runner.spec`) into a :class:`~distill_runner.spec.RunSpec`, plus the checks that span keys
and the recipe, built here once and handed to the runner. A bad value fails with one line naming the
key, the value and the fix.

Docs: docs/reference/configuration.md
"""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from distill_runner import distributed
from distill_runner.errors import ConfigError
from distill_runner.schema import is_number, parse
from distill_runner.spec import RunSpec, TeacherSpec
from distill_runner.train.optimizers import check_loss_split


def compose(overrides: list[str]) -> DictConfig:
    """The distill-run config with ``overrides``, as the command line composes it: inside the running Hydra
    app, or in a short-lived one (scripts, tests, search workers)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def validate(cfg: DictConfig | RunSpec) -> RunSpec:
    """The typed config, or :class:`ConfigError` for the first bad user-facing value. A spec passes as it is."""
    if isinstance(cfg, RunSpec):
        return cfg
    spec = parse(RunSpec, cfg)
    _check_teacher_use(spec.teacher)
    for key, node in (("teacher", spec.teacher), ("trainer", spec.trainer)):
        _check_warmup(key, node.scheduler.warmup_epochs if node.scheduler else 0, node.epochs, node.scheduler)
    _check_distill(spec)
    check_loss_split(spec.trainer.optimizer.source, spec.recipe, spec.trainer.precision, distributed.launched())
    return spec


def _check_teacher_use(teacher: TeacherSpec) -> None:
    if teacher.epochs == 0 and teacher.weights is None and teacher.checkpoint is None:
        raise ConfigError(
            "teacher.epochs",
            0,
            "a teacher used as loaded needs teacher.checkpoint=PATH or teacher.weights; or train it: teacher.epochs=3",
        )
    if teacher.weights is not None and teacher.epochs == 0 and teacher.checkpoint is None:
        raise ConfigError(
            "teacher.epochs",
            0,
            "ImageNet weights come with a new head for this data set's classes and must be fine-tuned; use "
            "teacher.epochs>=1",
        )


def _check_warmup(node: str, warmup, epochs: int, scheduler) -> None:
    """The warm-up fits in the stage (a key set: absent, the schedule has none)."""
    if scheduler is None or "warmup_epochs" not in scheduler.source:
        return
    if not (is_number(warmup) and 0 <= warmup <= epochs):
        fix = f"use a number of epochs in [0, {node}.epochs={epochs}], e.g. {node}.scheduler.warmup_epochs=1"
        raise ConfigError(f"{node}.scheduler.warmup_epochs", warmup, fix)


def _check_distill(spec: RunSpec) -> None:
    """The extra teachers, their weights and the recipe (its keys are checked by the recipe itself, in one
    place: building it takes no model and no data). What is built here is what the runner uses."""
    from distill_runner.build import new_recipe
    from distill_runner.distill import signals

    distill = spec.distill
    signals.extra_teachers(distill)
    spec.distill.weights = signals.teacher_weights(distill)
    spec.recipe = new_recipe(distill)
