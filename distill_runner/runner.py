"""The experiment: config -> build -> stages (teacher, distill, baseline) -> evaluate -> report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from distill_runner import engine, metrics as measure, recipes
from distill_runner.config import validate
from distill_runner.data import DataBundle
from distill_runner.errors import ConfigError
from distill_runner.losses import CrossEntropy
from distill_runner.models import clone, count_parameters, load_checkpoint
from distill_runner.report import ROLES, write_report
from distill_runner.teacher import teacher_signal

log = logging.getLogger(__name__)


def build(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate`` with errors that name the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause.under(key) from None
        raise ConfigError(key, OmegaConf.select(node, "_target_"), f"could not be built: {cause or exc}") from None


def build_data(cfg: DictConfig) -> DataBundle:
    data = build(cfg.dataset, "dataset", seed=cfg.seed)
    log.info("data %s: %d classes, image %dx%d, train/val/test %s", data.name, data.num_classes, data.image_size, data.image_size,
             "/".join(str(sum(c)) for c in data.class_counts.values()))
    return data


def build_model(node: DictConfig, key: str, data: DataBundle, seed: int, **kwargs) -> nn.Module:
    """Build ``node.model`` for the data set; the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    return build(node.model, f"{key}.model", num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, **kwargs)


def build_teacher(node: DictConfig, key: str, data: DataBundle, seed: int) -> nn.Module:
    """A teacher as configured: architecture, then torchvision ``weights``, then ``checkpoint``."""
    try:
        teacher = build_model(node, key, data, seed, weights=node.weights)
    except ConfigError as exc:  # weights is set as <key>.weights, next to <key>.model
        raise ConfigError(f"{key}.weights", exc.value, exc.fix) if exc.key == f"{key}.model.weights" else exc from None
    if node.checkpoint is not None:
        load_checkpoint(teacher, node.checkpoint, key=f"{key}.checkpoint")
        log.info("%s weights loaded from %s", key, node.checkpoint)
    return teacher


@dataclass
class RunContext:
    """What every stage of a run shares."""

    cfg: DictConfig
    data: DataBundle
    device: torch.device
    precision: engine.Precision
    run_dir: Path

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"


def schedule(node: DictConfig, key: str) -> dict:
    """The Stage fields a config node with epochs/optimizer/scheduler keys sets."""
    return {"epochs": node.epochs, "optimizer": build(node.optimizer, f"{key}.optimizer"), "scheduler": build(node.scheduler, f"{key}.scheduler")}


def run_stage(ctx: RunContext, stage: engine.Stage, checkpoint_name: str) -> dict:
    """Fit one stage (logged to tb/<stage>), save its final weights; return its summary."""
    start = time.perf_counter()
    history = []
    if stage.epochs > 0:
        log.info("stage %s: %d epochs, %s, %s parameters", stage.name, stage.epochs, type(stage.recipe).__name__, f"{count_parameters(stage.model):,}")
        torch.manual_seed(ctx.cfg.seed)
        with SummaryWriter(ctx.tb_dir / stage.name) as writer:
            history = engine.fit(stage, ctx.data.train, ctx.data.val, ctx.device, ctx.precision, writer, ctx.checkpoint_dir, progress=ctx.cfg.trainer.progress)
    else:
        log.info("stage %s: skipped (0 epochs), using the model as loaded", stage.name)
    engine.atomic_save(stage.model.state_dict(), ctx.checkpoint_dir / f"{checkpoint_name}.pt")
    return {"epochs": stage.epochs, "final_val_acc": history[-1]["val/acc"] if history else None, "wall_time_s": time.perf_counter() - start, "history": history}


def prepare_teacher(ctx: RunContext, node: DictConfig, key: str = "teacher") -> tuple[nn.Module, dict]:
    """Build the teacher configured at ``node`` and fine-tune it with cross-entropy (``node.epochs``)."""
    teacher = build_teacher(node, key, ctx.data, ctx.cfg.seed)
    stage = engine.Stage(key, teacher, CrossEntropy(), **schedule(node, key))
    return teacher, run_stage(ctx, stage, key)


def _hparams(cfg: DictConfig) -> dict:
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not str(k).startswith("_"):
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """Run the whole experiment into ``run_dir``; return the metrics written to metrics.json."""
    validate(cfg)
    run_dir = Path(run_dir)
    device = engine.resolve_device(cfg.trainer.device)
    precision = engine.resolve_precision(cfg.trainer.precision, device, cfg.trainer.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("run folder %s; device %s, precision %s, seed %d", run_dir, device, precision.name, cfg.seed)

    data = build_data(cfg)
    ctx = RunContext(cfg, data, device, precision, run_dir)
    recipe_node, extra_teachers, teacher_weights = recipes.split_distill_node(cfg.distill)  # multi_teacher: distill.teachers
    recipe = build(recipe_node, "distill")
    student_init = build_model(cfg.student, "student", data, cfg.seed)
    # layer names checked, adapters/heads built, before any training (the teacher's architecture only)
    recipes.bind(recipe, student_init, lambda: build_model(cfg.teacher, "teacher", data, cfg.seed), data)

    teacher, teacher_info = prepare_teacher(ctx, cfg.teacher)
    stage_info = {"teacher": teacher_info}
    teachers = [teacher]
    for key, node in extra_teachers.items():
        extra, stage_info[key] = prepare_teacher(ctx, node, key)
        teachers.append(extra)
    student, baseline = clone(student_init), clone(student_init)  # identical initial weights
    students = schedule(cfg.trainer, "trainer")
    signal = teacher_signal(teachers, teacher_weights, getattr(recipe, "teacher_layers", ()))
    stage_info["distill"] = run_stage(ctx, engine.Stage("distill", student, recipe, teacher=signal, **students), "student")
    stage_info["distill"]["recipe_params"] = count_parameters(recipe) if isinstance(recipe, nn.Module) else 0  # adapters/heads, not shipped
    stage_info["baseline"] = run_stage(ctx, engine.Stage("baseline", baseline, CrossEntropy(), **students), "baseline")
    models = {"teacher": teacher, "student": student, "baseline": baseline}

    results = evaluate(cfg, data, models, device, precision)
    metrics = {
        "dataset": data.name,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "class_counts": data.class_counts,
        "device": str(device),
        "precision": precision.name,
        "seed": cfg.seed,
        "models": results,
        "retention": results["student"]["test_acc"] / results["teacher"]["test_acc"],
        "kd_gain": results["student"]["test_acc"] - results["baseline"]["test_acc"],
        "stages": stage_info,
    }
    with SummaryWriter(ctx.tb_dir) as writer:
        final = {f"test/{role}_acc": results[role]["test_acc"] for role in ROLES}
        final.update({"test/retention": metrics["retention"], "test/kd_gain": metrics["kd_gain"]})
        writer.add_hparams(_hparams(cfg), final, run_name=".")
    table = write_report(run_dir, metrics, overrides or [])
    log.info("results on the test split:\n%s\nreport: %s", table, run_dir / "report.md")
    return metrics


def evaluate(cfg: DictConfig, data: DataBundle, models: dict[str, nn.Module], device: torch.device, precision: engine.Precision) -> dict:
    names = {"teacher": cfg.teacher.name, "student": cfg.student.name, "baseline": cfg.student.name}
    shape = (data.in_channels, data.image_size, data.image_size)
    results = {}
    for role, model in models.items():
        logits, targets = engine.predict(model.to(device), data.test, device, precision)
        results[role] = {
            "name": names[role],
            "params": count_parameters(model),
            "test_acc": engine.accuracy(logits, targets),
            "images_per_s": measure.throughput(model, data.test.batch_size, shape, device, precision),
        }
    for role in results:
        results[role]["speedup"] = results[role]["images_per_s"] / results["teacher"]["images_per_s"]
    return results
