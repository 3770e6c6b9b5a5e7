"""The experiment, as a pipeline: validate -> build -> stages (teacher, student, baseline) ->
evaluate -> export -> report. Each step is one short function below.

Docs: docs/architecture.md
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from distill_runner import build as builders
from distill_runner import distributed
from distill_runner.config import validate
from distill_runner.distill import signals
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import Interrupted, UserError
from distill_runner.evaluation import export
from distill_runner.evaluation import metrics as measure
from distill_runner.evaluation.evaluate import comparison, evaluate
from distill_runner.io import run_folder, storage
from distill_runner.io.cache import baseline_key, teacher_key
from distill_runner.io.run_folder import claim, follow_log, release, resume_dir
from distill_runner.io.trust import check_cache_folders
from distill_runner.models.factories import clone, count_parameters
from distill_runner.reporting import tensorboard
from distill_runner.reporting.report import write_report
from distill_runner.reporting.results import RunResults, StageResult
from distill_runner.spec import RunSpec, TeacherSpec
from distill_runner.train import engine, health
from distill_runner.train.stages import RunContext, run_or_reuse, run_stage, schedule

log = logging.getLogger(__name__)


@dataclass
class BuiltModels:
    """What the build step makes: the recipe and the models the stages train."""

    recipe: Recipe
    teacher_skip_reason: str | None  # why this run trains no teacher (see reference_teacher); None: it trains them
    student: nn.Module  # the KD student; the baseline starts from a copy of its initial weights (student.checkpoint)
    baseline: nn.Module
    teachers: dict[str, nn.Module]  # stage name (teacher, then distill.teachers.<name>) -> model; {} without one
    extra_teachers: dict[str, TeacherSpec]  # distill.teachers.<name> -> teacher node


Run = RunContext  # a run's context: its typed config (what validation made, the recipe included), data, device, ...


def run(cfg: DictConfig | RunSpec, run_dir: str | Path, overrides: list[str] | None = None) -> RunResults | None:
    """Run the whole experiment into ``run_dir``; return its results (also in metrics.json).

    Under torchrun every process trains; rank 0 alone evaluates and writes (the others return None).
    """
    start = time.perf_counter()
    with session(cfg, run_dir, overrides) as ctx:
        return _run(ctx, start, list(overrides or []))


@contextmanager
def session(cfg: DictConfig | RunSpec, run_dir: str | Path, overrides: list[str] | None = None) -> Iterator[Run]:
    """The prepared run (:func:`prepare`), its folder released at the end; Ctrl-C inside names the folder
    (:class:`~distill_runner.errors.Interrupted`). A search trial runs in one too."""
    ctx = prepare(validate(cfg), Path(run_dir), list(overrides or []))
    try:
        yield ctx
    except KeyboardInterrupt:  # the command line says how to continue in this folder
        raise Interrupted(ctx.run_dir) from None
    finally:
        if distributed.is_main():
            release(ctx.run_dir)


def _run(ctx: Run, start: float, overrides: list[str]) -> RunResults | None:
    """The steps after the run folder is this run's."""
    built = build(ctx)
    teachers, stages = train(ctx, built)
    if not distributed.is_main():
        return None
    models = {**teachers, "student": built.student, "baseline": built.baseline}
    results = evaluate_models(ctx, built, models, stages)
    export_student(ctx, built, results)
    results.wall_time_s = time.perf_counter() - start
    report(ctx, built, results, overrides)
    return results


def prepare(cfg: DictConfig | RunSpec, run_dir: Path, overrides: list[str]) -> Run:
    """The device, the run folder (another one when resuming) and the data (a config not validated yet is)."""
    spec = validate(cfg)
    trainer = spec.trainer
    device = distributed.init(engine.resolve_device(trainer.device))
    claimed = None
    if distributed.is_main():  # rank 0 picks and claims the folder; every process stops on a problem
        try:
            claimed = (own_folder(spec, run_dir, overrides), None)
        except UserError as exc:
            claimed = (None, (type(exc), exc.key, exc.value, exc.fix))
    run_dir, problem = distributed.broadcast(claimed)  # the folders of ranks > 0 are not used
    if problem is not None:
        error, *details = problem  # the same kind on every rank: ConfigError or StorageError
        raise error(*details)
    precision = engine.resolve_precision(trainer.precision, device, trainer.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("run folder %s; device %s, precision %s, seed %d", run_dir, device, precision.name, spec.seed)
    data = builders.build_data(spec, device)
    if distributed.active():  # every process trains on its part of each epoch and validates on its part of val
        data.train.shard(distributed.rank(), distributed.world_size(), pad=True)
        data.val.shard(distributed.rank(), distributed.world_size(), pad=False)
    speed = engine.Speed(channels_last=trainer.channels_last, compile=trainer.compile)
    return Run(spec, data, device, precision, run_dir, speed)


def own_folder(spec: RunSpec, run_dir: Path, overrides: list[str]) -> Path:
    """The run folder (another one when resuming, where the log goes on), claimed for this run alone;
    the cache's folders checked first."""
    check_cache_folders(spec)
    resume, folder = spec.trainer.resume, run_dir
    if resume:
        folder = resume_dir(spec, run_dir, overrides)
        resuming = (folder / "checkpoints").is_dir()
        what = "resuming the run in" if resuming else f"nothing to resume yet (trainer.resume={resume}): starting in"
        log.info("%s %s", what, folder)
    claim(spec, folder, resuming=bool(resume))
    if folder != run_dir:
        follow_log(run_dir, folder)
    return folder


def build(ctx: Run) -> BuiltModels:
    """The student, the teachers (each built once: binding the recipe, sizing the run and training
    share it) and the recipe validation built, bound to them; the run folder's room checked (every
    process stops together when it lacks room, not only rank 0)."""
    spec = ctx.spec
    student = builders.build_student(spec.student, ctx.data, spec.seed)
    recipe = spec.recipe
    teacher_skip_reason = skip_teacher(spec, recipe)
    if teacher_skip_reason is None:
        teacher = builders.build_teacher(spec.teacher, "teacher", ctx.data, spec.seed)
    else:  # the architecture alone: no weights to download or load for a teacher the run does not use
        teacher = builders.build_model(spec.teacher, "teacher", ctx.data, spec.seed)
    builders.bind_recipe(recipe, student, teacher, ctx.data)
    teachers, extra_teachers = {}, {}
    if teacher_skip_reason is None:
        extra_teachers = {f"distill.teachers.{name}": node for name, node in spec.distill.teachers.items()}
        extras = {key: builders.build_teacher(node, key, ctx.data, spec.seed) for key, node in extra_teachers.items()}
        teachers = {"teacher": teacher, **extras}
    problem = None
    if distributed.is_main():
        try:
            check_room(ctx, student, list(teachers.values()))
        except UserError as exc:
            problem = (type(exc), exc.key, exc.value, exc.fix)
    problem = distributed.broadcast(problem)
    if problem is not None:
        error, *details = problem  # the same kind on every rank: ConfigError or StorageError
        raise error(*details)
    if teacher_skip_reason is not None:
        log.info("teacher: none in this run (%s)", teacher_skip_reason)
    baseline = clone(student)  # identical initial weights
    # the KD student is the one the recipe was bound to: a term may hold its classifier (SDD, CAT-KD)
    return BuiltModels(recipe, teacher_skip_reason, student, baseline, teachers, extra_teachers)


def check_room(ctx: RunContext, student: nn.Module, teachers: list[nn.Module]) -> None:
    """:func:`run_folder.check_room` for what this run will write: per trained model its final, best, last
    and previous-last checkpoints in the run folder; cached teachers, baseline and teacher outputs."""
    teacher_params, student_params = sum(count_parameters(t) for t in teachers), count_parameters(student)
    run_bytes = storage.checkpoint_bytes(teacher_params) + 2 * storage.checkpoint_bytes(student_params)
    if ctx.cache is None:
        return run_folder.check_room(ctx.run_dir, None, run_bytes, 0)
    data, spec = ctx.data, ctx.spec
    outputs_mb = min(
        spec.cache.max_teacher_outputs_mb, data.train.num_samples * spec.trainer.epochs * data.num_classes * 4 / 2**20
    )
    cache_bytes = 4 * (teacher_params + student_params) + int(outputs_mb * 2**20)
    run_folder.check_room(ctx.run_dir, ctx.cache.root, run_bytes, cache_bytes)


def skip_teacher(spec: RunSpec, recipe: Recipe) -> str | None:
    """Why this run needs no teacher, or None when it trains (or loads) one.

    ``reference_teacher``: ``auto`` (default) trains the teacher only when the recipe uses it, but
    keeps one that needs no training (``teacher.epochs=0``: used as loaded) as the reference;
    ``true`` always fine-tunes it to report next to the students; ``false`` never when unused.
    """
    mode = spec.reference_teacher
    if recipe.needs_teacher or mode is True or (mode == "auto" and spec.teacher.epochs == 0):
        return None
    mode = str(mode).lower()
    return f"the recipe needs no teacher and reference_teacher={mode}; reference_teacher=true fine-tunes one to compare"


def train_teachers(ctx: Run, built: BuiltModels) -> tuple[dict[str, nn.Module], dict[str, StageResult]]:
    """Every teacher, fine-tuned with cross-entropy (or loaded from the cache, or used as loaded),
    by stage name: ``teacher`` first, then ``distill.teachers.<name>``; none when the run needs none."""
    teachers, stages = {}, {}
    for key, model in built.teachers.items():
        node = ctx.spec.teacher if key == "teacher" else built.extra_teachers[key]
        recipe = builders.cross_entropy(ctx.data, model, node.label_smoothing)
        hook = run_estimate(ctx, built, model) if key == "teacher" else None
        stage = engine.Stage(key, model, recipe, on_epoch=hook, **schedule(node, key))
        if node.epochs == 0:
            stages[key] = run_stage(ctx, stage)
        else:
            stages[key] = run_or_reuse(ctx, stage, "teachers", teacher_key(ctx.spec, key, ctx.data.fingerprint))
        teachers[key] = model
        if hook is not None and not hook.said and stages[key].history:  # reused: its pace when it was trained
            hook(stages[key].epochs - 1, stages[key].history[0], model)
        counts, classes = ctx.data.class_counts.get("val"), ctx.data.num_classes
        if warning := health.teacher_check(key, stages[key].final_val_acc, counts, classes):
            log.warning(warning)
    return teachers, stages


def run_estimate(ctx: Run, built: BuiltModels, teacher: nn.Module) -> health.RunEstimate:
    """The epoch hook that logs the whole run's estimate after the teacher's first epoch."""
    shape = (ctx.data.in_channels, ctx.data.image_size, ctx.data.image_size)
    student, cpu = measure.flops_per_image(built.student, shape, torch.device("cpu")), torch.device("cpu")
    relative = student / max(measure.flops_per_image(teacher.cpu(), shape, cpu), 1)
    online = ctx.spec.distill.teacher_outputs == "online"
    return health.RunEstimate(ctx.spec.teacher.epochs, ctx.spec.trainer.epochs, relative, online)


STAGES = ("teachers", "student", "baseline")


def train(
    ctx: Run, built: BuiltModels, stages=STAGES, on_student_epoch: engine.EpochHook | None = None
) -> tuple[dict[str, nn.Module], dict[str, StageResult]]:
    """The training stages in order (a search's teacher step runs the first; a trial the first two): the
    teachers; the KD student with the recipe and the teacher signal (``on_student_epoch``: see
    :func:`train_student`); the baseline with cross-entropy (it does not depend on the recipe: a sweep over
    KD settings trains it once). Returns the teachers by stage name and every stage's result."""
    teachers, results = train_teachers(ctx, built)
    if "student" in stages:
        results["student"] = train_student(ctx, built, list(teachers.values()), dict(results), on_student_epoch)
    if "baseline" in stages:
        student_schedule = schedule(ctx.spec.trainer, "trainer")
        supervised = builders.cross_entropy(ctx.data, built.baseline)
        baseline_stage = engine.Stage("baseline", built.baseline, supervised, **student_schedule)
        results["baseline"] = run_or_reuse(
            ctx, baseline_stage, "baselines", baseline_key(ctx.spec, ctx.data.fingerprint)
        )
    return teachers, results


def train_student(
    ctx: Run,
    built: BuiltModels,
    teachers: list[nn.Module],
    finished_teachers: dict,
    on_epoch: engine.EpochHook | None = None,
) -> StageResult:
    """The KD student alone, with the recipe and the teacher signal (replayed from the cache when it
    can be); ``on_epoch`` sees each epoch's record (a search trial reports it and may stop the stage)."""
    spec = ctx.spec
    teacher_keys = [
        finished_teachers[k].cache_key or teacher_key(spec, k, ctx.data.fingerprint) for k in finished_teachers
    ]
    source = signals.TeacherSignalSource(
        spec, built.recipe, ctx.data, teachers, teacher_keys, ctx.cache, ctx.device, ctx.precision
    )
    signal = source.signal()
    student_schedule = schedule(spec.trainer, "trainer")
    built.student = deploy(built)
    stage = engine.Stage("student", built.student, built.recipe, teacher=signal, on_epoch=on_epoch, **student_schedule)
    student = run_stage(ctx, stage)
    student.recipe_params = count_parameters(built.recipe)  # adapters/heads, not shipped
    student.includes = getattr(built.student, "includes", None)
    return student


def deploy(built: BuiltModels) -> nn.Module:
    """The KD student as it ships (:meth:`Recipe.deployed`, after the teachers' training: SimKD copies the
    teacher's head): what the student stage trains and checkpoints, and evaluation and export see."""
    model = built.recipe.deployed(built.student)
    if model is not built.student:
        log.info("the KD student ships with %s (%s parameters in all)", model.includes, f"{count_parameters(model):,}")
    return model


def evaluate_models(ctx: Run, built: BuiltModels, models: dict, stages: dict[str, StageResult]) -> RunResults:
    """Every model on the test split, and the comparison."""
    start = time.perf_counter()
    layer_pairs = measure.feature_layers(built.recipe)
    cache_keys = {"teacher": stages["teacher"].cache_key if "teacher" in stages and not built.extra_teachers else None,
                  "baseline": stages["baseline"].cache_key}  # fmt: skip
    model_results, speed_source = evaluate(
        ctx.spec, ctx.data, models, ctx.device, ctx.precision, ctx.checkpoint_dir, layer_pairs, ctx.cache, cache_keys
    )
    data = ctx.data
    return RunResults(
        dataset=data.name, num_classes=data.num_classes, class_names=data.class_names, class_counts=data.class_counts,
        device=str(ctx.device), processes=distributed.world_size(), precision=ctx.precision.name, seed=ctx.spec.seed,
        eval_batch_size=data.test.batch_size, torch_threads=torch.get_num_threads(), models=model_results,
        stages=stages, **comparison(model_results, built.teacher_skip_reason), eval_time_s=time.perf_counter() - start,
        speed_source=speed_source,
    )  # fmt: skip


def export_student(ctx: Run, built: BuiltModels, results: RunResults) -> None:
    """``export=onnx``: the KD student as ONNX and TorchScript, checked on the test split."""
    if ctx.spec.export == "onnx":
        results.exports["student"] = export.export_and_check(built.student, ctx.data, ctx.run_dir / "export", "student")


def report(ctx: Run, built: BuiltModels, results: RunResults, overrides: list[str]) -> None:
    """HParams and figures in TensorBoard; metrics.json, plots and report.md in the run folder, report.md last:
    a folder without it is not a finished run."""
    recipe = tensorboard.recipe_name(built.recipe.terms, overrides)
    name = tensorboard.run_name(ctx.spec, overrides, recipe)
    hparams = tensorboard.hparams(ctx.spec, results, recipe, name)
    tensorboard.write_tensorboard(ctx.tb_dir, results, hparams, overrides, name)
    table = write_report(ctx.run_dir, results, overrides)
    log.info("results on the test split (%s):\n%s\nreport: %s (evaluation %.1fs)", name, table,
             ctx.run_dir / "report.md", results.eval_time_s)  # fmt: skip
