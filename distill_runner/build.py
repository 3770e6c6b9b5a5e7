"""Config -> objects: the data, the models and the recipe, each built with ``hydra.utils.instantiate``
from its ``_target_`` (errors name the config key).

Docs: docs/guide/configuration.md
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from distill_runner.data.bundle import DataBundle
from distill_runner.distill import signals
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import ConfigError, instantiate
from distill_runner.models.checkpoints import load_checkpoint
from distill_runner.schema import Spec
from distill_runner.spec import DistillSpec, RunSpec, StudentSpec, TeacherSpec, typed
from distill_runner.train import engine

log = logging.getLogger(__name__)


def _node(node):
    """What a factory's node was read from (what Hydra instantiates from its ``_target_``)."""
    return node.source if isinstance(node, Spec) else node


def build_data(spec: RunSpec, device: torch.device | None = None) -> DataBundle:
    """The data set, its training batches served on ``device`` (default: ``trainer.device``)."""
    spec = typed(spec)
    data = instantiate(_node(spec.dataset), "dataset", seed=spec.seed)
    on_device = spec.data.on_device if spec.data is not None else "auto"
    data.place(device or engine.resolve_device(spec.trainer.device), on_device)
    sizes = "/".join(str(sum(c)) for c in data.class_counts.values())
    log.info("data %s: %d classes, image %dpx, train/val/test %s", data.name, data.num_classes, data.image_size, sizes)
    names = ", ".join(data.class_names) if data.num_classes <= 20 else f"{data.num_classes} classes"
    log.info("class counts (%s): %s", names, "; ".join(f"{s} {c}" for s, c in data.class_counts.items()))
    return data


def build_model(node: TeacherSpec | StudentSpec, key: str, data: DataBundle, seed: int, **kwargs) -> nn.Module:
    """Build ``node.model`` for the data set; the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    shape = {"num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": data.image_size}
    return instantiate(_node(node.model), f"{key}.model", **shape, **kwargs)


def build_teacher(node: TeacherSpec, key: str, data: DataBundle, seed: int) -> nn.Module:
    """A teacher as configured: architecture, then torchvision ``weights``, then ``checkpoint``. With a checkpoint
    the pretrained weights are not fetched: the checkpoint must set every weight (it is loaded strictly)."""
    weights = node.weights
    if node.checkpoint is not None and weights is not None:
        log.info("%s.checkpoint is given: %s.weights=%s not fetched (the checkpoint sets every weight)", key, key,
                 weights)  # fmt: skip
        weights = None
    try:
        teacher = build_model(node, key, data, seed, weights=weights)
    except ConfigError as exc:  # weights is set as <key>.weights, next to <key>.model
        if exc.key != f"{key}.model.weights":
            raise
        fix = exc.fix.replace(f"{key}.model.weights=", f"{key}.weights=")
        raise ConfigError(f"{key}.weights", exc.value, fix) from None
    if node.checkpoint is not None:
        load_checkpoint(teacher, node.checkpoint, key=f"{key}.checkpoint")
    return teacher


def build_student(node: StudentSpec, data: DataBundle, seed: int) -> nn.Module:
    """The student: its architecture, then ``student.checkpoint`` when set. The weights are an initialisation:
    the KD student and the scratch baseline both start from them (the baseline is the same student trained
    without the teacher, so the comparison measures what distillation adds)."""
    student = build_model(node, "student", data, seed)
    path = node.checkpoint if isinstance(node, Spec) else node.get("checkpoint")
    if path is not None:
        load_checkpoint(student, path, key="student.checkpoint")
    return student


def build_recipe(spec: RunSpec, data: DataBundle, student: nn.Module, teacher: nn.Module | None = None) -> Recipe:
    """The distill stage's recipe, bound to the student and the teacher's architecture (``teacher``, or
    an untrained one built from ``spec.teacher``: that is all binding needs)."""
    spec = typed(spec)
    recipe = new_recipe(spec.distill)
    if teacher is None:
        teacher = build_model(spec.teacher, "teacher", data, spec.seed)
    bind_recipe(recipe, student, teacher, data)
    return recipe


def new_recipe(distill: DistillSpec) -> Recipe:
    """The ``distill`` node as a Recipe, not bound yet (its terms say whether it needs a teacher)."""
    recipe = instantiate(signals.recipe_node(distill), "distill", _recursive_=False)
    if not isinstance(recipe, Recipe):
        fix = "a recipe is distill_runner.distill.Recipe with terms (see conf/distill/kd.yaml)"
        raise ConfigError("distill._target_", distill._target_, fix)
    return recipe


def bind_recipe(recipe: Recipe, student: nn.Module, teacher: nn.Module, data: DataBundle) -> None:
    """Check the recipe's layer names against the models and build its adapters, before any training."""
    try:
        recipe.bind(student, teacher, data)
    except ConfigError as exc:
        raise exc.under("distill") from None
    n = sum(p.numel() for p in recipe.parameters())
    if n:
        log.info(
            "recipe adds %s trainable parameters (adapters/heads): trained with the student, not part of it", f"{n:,}"
        )


def cross_entropy(data: DataBundle, model: nn.Module, label_smoothing: float = 0.0) -> Recipe:
    """The teacher's fine-tune and the baseline: cross-entropy alone, class weights from the data."""
    recipe = Recipe.cross_entropy(label_smoothing)
    recipe.bind(model, None, data)
    return recipe
