"""A run's stages: fit a model with a recipe (:func:`engine.fit`) into the run folder, or load it from
the cache when the same stage was trained before (a sweep trains its teacher and baseline once).

Docs: docs/architecture.md
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from distill_runner import distributed
from distill_runner.data.bundle import DataBundle
from distill_runner.errors import instantiate
from distill_runner.io import storage
from distill_runner.io.cache import Cache
from distill_runner.models.factories import count_parameters
from distill_runner.reporting.results import StageResult
from distill_runner.schema import Spec
from distill_runner.spec import RunSpec, TeacherSpec, TrainerSpec
from distill_runner.train import engine
from distill_runner.train.resume import previous_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every stage of a run shares: the typed config (validated once, by the runner) first."""

    spec: RunSpec
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
        return Cache.from_spec(self.spec.cache)


def schedule(node: TeacherSpec | TrainerSpec, key: str) -> dict:
    """The Stage fields a node with epochs/optimizer/scheduler keys sets (the optimizer and the schedule built by
    Hydra from their ``_target_`` nodes)."""
    return {
        "epochs": node.epochs,
        "optimizer": instantiate(_source(node.optimizer), f"{key}.optimizer"),
        "scheduler": instantiate(_source(node.scheduler), f"{key}.scheduler"),
    }


def _source(node: Spec | None):
    """What a factory's node was read from (what Hydra instantiates)."""
    return node.source if node is not None else None


def run_stage(ctx: RunContext, stage: engine.Stage) -> StageResult:
    """Fit one stage (logged to tb/<stage>), save its final weights as checkpoints/<stage>.pt.

    ``checkpoints/<stage>.json`` marks a finished stage: a resumed run loads its weights and skips
    it (its ``<stage>_last.pt`` and ``_last.prev.pt`` are removed once it finishes; ``<stage>_best.pt``
    stays); an unfinished one continues from ``<stage>_last.pt``. Both are verified against their
    checksums: a damaged one does not count as finished (the stage is trained again, with a warning).
    """
    start = time.perf_counter()
    weights, result_file = ctx.checkpoint_dir / f"{stage.name}.pt", ctx.checkpoint_dir / f"{stage.name}.json"
    resume = bool(ctx.spec.trainer.resume)
    if resume and distributed.broadcast(result_file.is_file() and weights.is_file()):
        finished = _load_finished(stage.name, weights, result_file)  # every rank reads the same files: the same answer
        if finished is not None:
            stage.model.load_state_dict(finished[0])
            log.info("stage %s: finished before, loaded from %s", stage.name, weights)
            return finished[1]
    history = []
    if ctx.spec.eval is not None and ctx.spec.eval.test_every_epoch:
        stage.on_epoch = with_test_accuracy(ctx, stage.on_epoch)
    if stage.epochs > 0:
        params = f"{count_parameters(stage.model):,}"
        log.info(
            "stage %s: %d epochs, recipe %s, %s parameters", stage.name, stage.epochs, stage.recipe.describe(), params
        )
        torch.manual_seed(ctx.spec.seed)
        with SummaryWriter(ctx.tb_dir / stage.name) if distributed.is_main() else nullcontext() as writer:
            loop = {"progress": ctx.spec.trainer.progress, "resume": resume, "speed": ctx.speed}
            loop |= {"writer": writer, "checkpoint_dir": ctx.checkpoint_dir}
            history = engine.fit(stage, ctx.data.train, ctx.data.val, ctx.device, ctx.precision, **loop)
    else:
        log.info("stage %s: skipped (0 epochs), using the model as loaded", stage.name)
    result = StageResult(
        stage.epochs, history[-1]["val/acc"] if history else None, time.perf_counter() - start, history
    )
    tested = [(h["test/acc"], epoch) for epoch, h in enumerate(history, 1) if "test/acc" in h]
    if tested:
        result.best_test_acc, result.best_test_epoch = max(tested, key=lambda t: (t[0], -t[1]))  # ties: the first
        result.last_test_acc = tested[-1][0]
    storage.save_verified(stage.model.state_dict(), weights)
    storage.write_text_verified(result_file, json.dumps(asdict(result)))  # last: only now is the stage finished
    if distributed.is_main():  # finished: the resumable states (weights + optimizer, twice) go; final and best stay
        last = ctx.checkpoint_dir / f"{stage.name}_last.pt"
        for path in (previous_checkpoint(last), last):
            storage.remove_verified(path)
    return result


def with_test_accuracy(ctx: RunContext, then: Callable | None) -> Callable:
    """A Stage.on_epoch that adds the test split's accuracy to each epoch's record as ``test/acc`` (every
    process measures the whole test split, which is not sharded), then calls ``then``."""

    def on_epoch(epoch: int, record: dict, model: torch.nn.Module) -> None:
        record["test/acc"] = engine.accuracy(*engine.predict(model, ctx.data.test, ctx.device, ctx.precision))
        if then is not None:
            then(epoch, record, model)

    return on_epoch


def _load_finished(name: str, weights: Path, result_file: Path) -> tuple[dict, StageResult] | None:
    """A finished stage's weights and result, or None (with a warning) when either file is damaged."""
    try:
        state = storage.load_verified(weights)
        result = StageResult(**json.loads(storage.read_text_verified(result_file)))
    except (storage.DamagedFile, ValueError, TypeError) as exc:  # ValueError, TypeError: an unverified file of before
        log.warning("stage %s: the finished stage's checkpoint is damaged (%s); training the stage again", name, exc)
        return None
    return state, result


def run_or_reuse(ctx: RunContext, stage: engine.Stage, kind: str, cache_key: str) -> StageResult:
    """:func:`run_stage`, unless the cache holds this stage's result under ``cache_key`` (then load
    it). The entry's lock makes parallel jobs wait for the one that trains. ``checkpoints/<stage>.pt``
    is a hard link to the cached weights: a sweep's jobs share one copy of the teacher on disk."""
    cache = ctx.cache
    if cache is None:
        return run_stage(ctx, stage)
    start = time.perf_counter()

    def train() -> tuple[dict, dict]:
        verb = "fine-tuning" if kind == "teachers" else "training"
        log.info("%s %s %s (not in the cache yet)", verb, stage.name, cache_key)
        info = asdict(run_stage(ctx, stage))
        return stage.model.state_dict(), info

    state, info, source = cache.fetch_model(kind, cache_key, train)
    result = StageResult(**info)
    storage.link_verified(cache.weights_path(kind, cache_key), ctx.checkpoint_dir / f"{stage.name}.pt")
    if source.startswith("reused"):
        stage.model.load_state_dict(state)
        result.reused, result.wall_time_s = True, time.perf_counter() - start
        log.info("reusing %s %s, %s (trained before: same config, data and seed)", stage.name, cache_key, source)
    result.cache_key = cache_key
    return result
