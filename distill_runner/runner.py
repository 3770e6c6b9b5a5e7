"""The experiment: config -> build -> stages (teacher, distill, baseline) -> evaluate -> report."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from distill_runner import storage
from distill_runner.cache import Cache, baseline_key, digest, replayed_teacher_signal, teacher_key
from distill_runner.config import validate
from distill_runner.data.bundle import DataBundle
from distill_runner.distill import recipes
from distill_runner.distill.losses import CrossEntropy
from distill_runner.distill.teacher import teacher_signal
from distill_runner.errors import ConfigError
from distill_runner.evaluation import export
from distill_runner.evaluation import metrics as measure
from distill_runner.evaluation.evaluate import comparison, evaluate
from distill_runner.models.factories import clone, count_parameters, load_checkpoint
from distill_runner.reporting.report import write_report, write_tensorboard
from distill_runner.train import distributed, engine

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


def recipe_node(cfg: DictConfig) -> DictConfig:
    """``distill`` without the keys the runner reads itself (how teacher outputs are provided)."""
    node = OmegaConf.to_container(cfg.distill, resolve=True)
    node.pop("teacher_outputs", None)
    return OmegaConf.create(node)


def build_data(cfg: DictConfig, device: torch.device | None = None) -> DataBundle:
    """The data set, its training batches served on ``device`` (default: ``trainer.device``)."""
    data = build(cfg.dataset, "dataset", seed=cfg.seed)
    data.place(
        device or engine.resolve_device(cfg.trainer.device), OmegaConf.select(cfg, "data.on_device", default="auto")
    )
    log.info(
        "data %s: %d classes, image %dx%d, train/val/test %s",
        data.name,
        data.num_classes,
        data.image_size,
        data.image_size,
        "/".join(str(sum(c)) for c in data.class_counts.values()),
    )
    names = ", ".join(data.class_names) if data.num_classes <= 20 else f"{data.num_classes} classes"
    log.info("class counts (%s): %s", names, "; ".join(f"{s} {c}" for s, c in data.class_counts.items()))
    return data


def build_model(node: DictConfig, key: str, data: DataBundle, seed: int, **kwargs) -> nn.Module:
    """Build ``node.model`` for the data set; the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    return build(
        node.model,
        f"{key}.model",
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        **kwargs,
    )


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
    speed: engine.Speed = engine.Speed()

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"


def schedule(node: DictConfig, key: str) -> dict:
    """The Stage fields a config node with epochs/optimizer/scheduler keys sets."""
    return {
        "epochs": node.epochs,
        "optimizer": build(node.optimizer, f"{key}.optimizer"),
        "scheduler": build(node.scheduler, f"{key}.scheduler"),
    }


def run_stage(ctx: RunContext, stage: engine.Stage, checkpoint_name: str) -> dict:
    """Fit one stage (logged to tb/<stage>), save its final weights; return its summary.

    ``checkpoints/<name>.json`` marks a finished stage: a resumed run loads its weights and skips
    it; an unfinished one continues from ``<stage>_last.pt``.
    """
    start = time.perf_counter()
    weights, done = ctx.checkpoint_dir / f"{checkpoint_name}.pt", ctx.checkpoint_dir / f"{checkpoint_name}.json"
    resume = bool(ctx.cfg.trainer.get("resume", False))
    if resume and distributed.broadcast(done.is_file() and weights.is_file()):
        stage.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log.info("stage %s: finished before, loaded from %s", stage.name, weights)
        return json.loads(done.read_text())
    history = []
    if stage.epochs > 0:
        log.info(
            "stage %s: %d epochs, %s, %s parameters",
            stage.name,
            stage.epochs,
            type(stage.recipe).__name__,
            f"{count_parameters(stage.model):,}",
        )
        torch.manual_seed(ctx.cfg.seed)
        with SummaryWriter(ctx.tb_dir / stage.name) if distributed.is_main() else nullcontext() as writer:
            history = engine.fit(
                stage,
                ctx.data.train,
                ctx.data.val,
                ctx.device,
                ctx.precision,
                writer,
                ctx.checkpoint_dir,
                progress=ctx.cfg.trainer.progress,
                resume=resume,
                speed=ctx.speed,
            )
    else:
        log.info("stage %s: skipped (0 epochs), using the model as loaded", stage.name)
    info = {
        "epochs": stage.epochs,
        "final_val_acc": history[-1]["val/acc"] if history else None,
        "wall_time_s": time.perf_counter() - start,
        "history": history,
    }
    engine.atomic_save(stage.model.state_dict(), weights)
    engine.atomic_write_text(done, json.dumps(info))
    return info


def prepare_teacher(ctx: RunContext, node: DictConfig, key: str = "teacher") -> tuple[nn.Module, dict]:
    """Build the teacher configured at ``node`` and fine-tune it with cross-entropy (``node.epochs``).

    A teacher fine-tuned before with the same config, data and seed is loaded from the cache
    instead; parallel jobs asking for the same teacher wait for the one that trains it.
    """
    teacher = build_teacher(node, key, ctx.data, ctx.cfg.seed)
    stage = engine.Stage(key, teacher, CrossEntropy(class_weights=ctx.data.class_weights), **schedule(node, key))
    if node.epochs == 0:
        return teacher, run_stage(ctx, stage, key)
    return teacher, run_or_reuse(
        ctx, stage, key, "teachers", teacher_key(ctx.cfg, node, ctx.data.fingerprint), verb="fine-tuning"
    )


def run_or_reuse(
    ctx: RunContext, stage: engine.Stage, checkpoint_name: str, kind: str, cache_key: str, verb: str = "training"
) -> dict:
    """:func:`run_stage`, unless the cache holds this stage's result under ``cache_key`` (then
    load it). The entry's lock makes parallel jobs wait for the one that trains."""
    cache = Cache.from_config(ctx.cfg)
    if cache is None:
        return run_stage(ctx, stage, checkpoint_name)
    start = time.perf_counter()
    with cache.locked(kind, cache_key) as path:  # under torchrun: rank 0 looks, all train or load
        entry = cache.load_shared(path)
        if entry is not None:
            stage.model.load_state_dict(entry["model"])
            engine.atomic_save(stage.model.state_dict(), ctx.checkpoint_dir / f"{checkpoint_name}.pt")
            info = dict(entry["info"], reused=True, wall_time_s=time.perf_counter() - start)
            log.info("reusing %s %s from %s (trained before: same config, data and seed)", stage.name, cache_key, path)
        else:
            log.info("%s %s %s (not in the cache yet)", verb, stage.name, cache_key)
            info = dict(run_stage(ctx, stage, checkpoint_name), reused=False)
            cache.store(path, {"model": stage.model.state_dict(), "info": info})
    return dict(info, cache_key=cache_key)


def check_room(ctx: RunContext, student: nn.Module, extra_teachers: dict) -> None:
    """Before training: the run folder and the cache are writable and their disks hold what the run
    will write (checkpoints of every stage, cached teachers and teacher outputs)."""
    cfg = ctx.cfg
    teacher_params = count_parameters(build_model(cfg.teacher, "teacher", ctx.data, cfg.seed))
    teachers = teacher_params * (1 + len(extra_teachers))
    run_bytes = storage.checkpoint_bytes(teachers) + 2 * storage.checkpoint_bytes(count_parameters(student))
    storage.check_writable(ctx.run_dir, "hydra.run.dir")
    storage.check_free_space(
        ctx.run_dir, run_bytes, "hydra.run.dir", "checkpoints of the teacher, the student and the baseline"
    )
    cache = Cache.from_config(cfg)
    if cache is not None:
        outputs_mb = min(
            cfg.cache.max_teacher_outputs_mb,
            getattr(ctx.data.train, "num_samples", 0) * cfg.trainer.epochs * ctx.data.num_classes * 4 / 2**20,
        )
        storage.check_writable(cache.root, "cache.dir")
        storage.check_free_space(
            cache.root, 4 * teachers + int(outputs_mb * 2**20), "cache.dir", "fine-tuned teachers and their outputs"
        )


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


def _without_resume(items) -> list:
    return [o for o in items if not o.lstrip("+~").startswith("trainer.resume")]


def resume_dir(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    """The run folder to continue: ``trainer.resume=PATH``, or with ``true`` this run's folder if it
    holds checkpoints, else the newest unfinished run under the same outputs folder started with
    the same overrides. Its config must equal this one (but for ``trainer.resume``). With ``auto``:
    this run's folder, whatever it holds (a fixed ``hydra.run.dir``, a requeued Slurm job)."""
    resume = cfg.trainer.get("resume", False)
    if resume == "auto":
        return run_dir
    if resume is True:
        if (run_dir / "checkpoints").is_dir():
            found = run_dir
        else:
            root = run_dir.parent.parent  # outputs/<date>/<time> -> outputs
            candidates = [
                p.parent.parent
                for p in root.glob("*/*/.hydra/overrides.yaml")
                if p.parent.parent != run_dir
                and not (p.parent.parent / "metrics.json").exists()
                and (p.parent.parent / "checkpoints").is_dir()
                and _without_resume(OmegaConf.load(p)) == _without_resume(overrides)
            ]
            if not candidates:
                raise ConfigError(
                    "trainer.resume",
                    True,
                    f"no unfinished run with the same overrides under {root}/; name the run folder: trainer.resume=outputs/<date>/<time>",
                )
            found = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        found = Path(str(resume)).expanduser()
        if not (found / ".hydra" / "config.yaml").is_file():
            raise ConfigError(
                "trainer.resume",
                str(resume),
                "not a run folder (no .hydra/config.yaml in it); give outputs/<date>/<time> of the run to continue",
            )
    saved_file = found / ".hydra" / "config.yaml"
    if saved_file.is_file() and found != run_dir:
        saved, now = OmegaConf.load(saved_file), OmegaConf.to_container(cfg)
        saved = OmegaConf.to_container(saved)
        saved["trainer"].pop("resume", None)
        now["trainer"].pop("resume", None)
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(
                "trainer.resume",
                str(resume),
                f"the run in {found} was started with another config (differs in: {', '.join(diff)}); resume it with the same overrides",
            )
    return found


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict | None:
    """Run the whole experiment into ``run_dir``; return the metrics written to metrics.json.

    Under torchrun every process trains; rank 0 alone evaluates and writes (the others return None).
    """
    validate(cfg)
    run_start = time.perf_counter()
    device = distributed.init(engine.resolve_device(cfg.trainer.device))
    run_dir = Path(run_dir)
    if cfg.trainer.get("resume", False) and distributed.is_main():
        run_dir = resume_dir(cfg, run_dir, list(overrides or []))
        has_checkpoints = (run_dir / "checkpoints").is_dir()
        log.info(
            "%s %s",
            "resuming the run in"
            if has_checkpoints
            else f"nothing to resume yet (trainer.resume={cfg.trainer.resume}): starting in",
            run_dir,
        )
    run_dir = distributed.broadcast(run_dir)  # the folders of ranks > 0 are not used
    precision = engine.resolve_precision(cfg.trainer.precision, device, cfg.trainer.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("run folder %s; device %s, precision %s, seed %d", run_dir, device, precision.name, cfg.seed)

    data = build_data(cfg, device)
    if distributed.active():  # every process trains on its part of each epoch and validates on its part of val
        data.train.shard(distributed.rank(), distributed.world_size(), pad=True)
        data.val.shard(distributed.rank(), distributed.world_size(), pad=False)
    speed = engine.Speed(
        channels_last=cfg.trainer.get("channels_last", False), compile=cfg.trainer.get("compile", False)
    )
    ctx = RunContext(cfg, data, device, precision, run_dir, speed)
    recipe_cfg, extra_teachers, teacher_weights = recipes.split_distill_node(
        recipe_node(cfg)
    )  # multi_teacher: distill.teachers
    recipe = build(
        recipe_cfg, "distill", **({"class_weights": data.class_weights} if data.class_weights is not None else {})
    )
    student_init = build_model(cfg.student, "student", data, cfg.seed)
    # layer names checked, adapters/heads built, before any training (the teacher's architecture only)
    recipes.bind(recipe, student_init, lambda: build_model(cfg.teacher, "teacher", data, cfg.seed), data)
    problem = None
    if distributed.is_main():
        try:
            check_room(ctx, student_init, extra_teachers)
        except ConfigError as exc:
            problem = (exc.key, exc.value, exc.fix)
    problem = distributed.broadcast(problem)
    if problem is not None:  # every process stops, not only rank 0
        raise ConfigError(*problem)

    teacher, teacher_info = prepare_teacher(ctx, cfg.teacher)
    stage_info = {"teacher": teacher_info}
    teachers, teacher_ids = (
        [teacher],
        [teacher_info.get("cache_key") or teacher_key(cfg, cfg.teacher, data.fingerprint)],
    )
    for key, node in extra_teachers.items():
        extra, stage_info[key] = prepare_teacher(ctx, node, key)
        teachers.append(extra)
        teacher_ids.append(stage_info[key].get("cache_key") or teacher_key(cfg, node, data.fingerprint))
    student, baseline = clone(student_init), clone(student_init)  # identical initial weights
    students = schedule(cfg.trainer, "trainer")
    online = teacher_signal(teachers, teacher_weights, getattr(recipe, "teacher_layers", ()))
    signal = replayed_teacher_signal(ctx, online, digest([teacher_ids, teacher_weights]), recipe)
    stage_info["distill"] = run_stage(
        ctx, engine.Stage("distill", student, recipe, teacher=signal, **students), "student"
    )
    stage_info["distill"]["recipe_params"] = (
        count_parameters(recipe) if isinstance(recipe, nn.Module) else 0
    )  # adapters/heads, not shipped
    # The baseline does not depend on the recipe: a sweep over KD settings trains it once.
    stage_info["baseline"] = run_or_reuse(
        ctx,
        engine.Stage("baseline", baseline, CrossEntropy(class_weights=data.class_weights), **students),
        "baseline",
        "baselines",
        baseline_key(cfg, data.fingerprint),
    )
    models = {"teacher": teacher, "student": student, "baseline": baseline}
    if not distributed.is_main():
        return None

    start = time.perf_counter()
    cache_keys = {
        "teacher": teacher_info.get("cache_key") if not extra_teachers else None,
        "baseline": stage_info["baseline"].get("cache_key"),
    }
    results = evaluate(
        cfg,
        data,
        models,
        device,
        precision,
        ctx.checkpoint_dir,
        measure.feature_layers(recipe),
        Cache.from_config(cfg),
        cache_keys,
    )
    metrics = {
        "dataset": data.name,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "class_counts": data.class_counts,
        "device": str(device),
        "processes": distributed.world_size(),
        "precision": precision.name,
        "seed": cfg.seed,
        "eval_batch_size": data.test.batch_size,
        "torch_threads": torch.get_num_threads(),
        "models": results,
        **comparison(results),
        "stages": stage_info,
    }
    if OmegaConf.select(cfg, "export", default=None) == "onnx":
        metrics["export"] = export.export_and_check(student, data, run_dir / "export", "student")
    metrics["eval_time_s"] = time.perf_counter() - start
    metrics["wall_time_s"] = time.perf_counter() - run_start
    table = write_report(run_dir, metrics, overrides or [])
    write_tensorboard(ctx.tb_dir, metrics, _hparams(cfg), overrides or [])
    log.info(
        "results on the test split:\n%s\nreport: %s (evaluation %.1fs)",
        table,
        run_dir / "report.md",
        metrics["eval_time_s"],
    )
    return metrics
