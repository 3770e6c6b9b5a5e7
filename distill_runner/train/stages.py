"""A run's stages: fit a model with a recipe (:func:`engine.fit`) into the run folder, or load it from
the cache when the same stage was trained before (a sweep trains its teacher and baseline once)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from distill_runner import distributed
from distill_runner.cache import Cache
from distill_runner.data.bundle import DataBundle
from distill_runner.errors import instantiate
from distill_runner.models.factories import count_parameters
from distill_runner.reporting.results import StageResult
from distill_runner.storage import atomic_save, atomic_write_text
from distill_runner.train import engine

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every stage of a run shares."""

    cfg: DictConfig
    data: DataBundle
    device: torch.device
    precision: engine.Precision
    run_dir: Path
    speed: engine.Speed = field(default_factory=engine.Speed)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def cache(self) -> Cache | None:
        return Cache.from_config(self.cfg)


def schedule(node: DictConfig, key: str) -> dict:
    """The Stage fields a config node with epochs/optimizer/scheduler keys sets (built by Hydra)."""
    return {
        "epochs": node.epochs,
        "optimizer": instantiate(node.optimizer, f"{key}.optimizer"),
        "scheduler": instantiate(node.scheduler, f"{key}.scheduler"),
    }


def run_stage(ctx: RunContext, stage: engine.Stage) -> StageResult:
    """Fit one stage (logged to tb/<stage>), save its final weights as checkpoints/<stage>.pt.

    ``checkpoints/<stage>.json`` marks a finished stage: a resumed run loads its weights and skips
    it; an unfinished one continues from ``<stage>_last.pt``.
    """
    start = time.perf_counter()
    weights, done = ctx.checkpoint_dir / f"{stage.name}.pt", ctx.checkpoint_dir / f"{stage.name}.json"
    resume = bool(ctx.cfg.trainer.get("resume", False))
    if resume and distributed.broadcast(done.is_file() and weights.is_file()):
        stage.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log.info("stage %s: finished before, loaded from %s", stage.name, weights)
        return StageResult(**json.loads(done.read_text()))
    history = []
    if stage.epochs > 0:
        params = f"{count_parameters(stage.model):,}"
        log.info(
            "stage %s: %d epochs, recipe %s, %s parameters", stage.name, stage.epochs, stage.recipe.describe(), params
        )
        torch.manual_seed(ctx.cfg.seed)
        with SummaryWriter(ctx.tb_dir / stage.name) if distributed.is_main() else nullcontext() as writer:
            loop = {"progress": ctx.cfg.trainer.progress, "resume": resume, "speed": ctx.speed}
            history = engine.fit(
                stage, ctx.data.train, ctx.data.val, ctx.device, ctx.precision, writer, ctx.checkpoint_dir, **loop
            )
    else:
        log.info("stage %s: skipped (0 epochs), using the model as loaded", stage.name)
    result = StageResult(
        stage.epochs, history[-1]["val/acc"] if history else None, time.perf_counter() - start, history
    )
    atomic_save(stage.model.state_dict(), weights)
    atomic_write_text(done, json.dumps(asdict(result)))
    return result


def run_or_reuse(ctx: RunContext, stage: engine.Stage, kind: str, cache_key: str) -> StageResult:
    """:func:`run_stage`, unless the cache holds this stage's result under ``cache_key`` (then load
    it). The entry's lock makes parallel jobs wait for the one that trains."""
    cache = ctx.cache
    if cache is None:
        return run_stage(ctx, stage)
    start = time.perf_counter()

    def train() -> dict:
        verb = "fine-tuning" if kind == "teachers" else "training"
        log.info("%s %s %s (not in the cache yet)", verb, stage.name, cache_key)
        return {"model": stage.model.state_dict(), "info": asdict(run_stage(ctx, stage))}

    entry, source = cache.fetch(kind, cache_key, train)
    result = StageResult(**entry["info"])
    if source.startswith("reused"):
        stage.model.load_state_dict(entry["model"])
        atomic_save(stage.model.state_dict(), ctx.checkpoint_dir / f"{stage.name}.pt")
        result.reused, result.wall_time_s = True, time.perf_counter() - start
        log.info("reusing %s %s, %s (trained before: same config, data and seed)", stage.name, cache_key, source)
    result.cache_key = cache_key
    return result
