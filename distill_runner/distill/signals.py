"""Teacher signals, and the one place that decides where a stage's teacher signal comes from.

- online: the frozen teacher's forward pass on each training batch (eval mode, no gradients);
- ensemble: several teachers, logits averaged with weights (features from the first, the run's ``teacher``);
- replayed: the online signal's logits computed once per (image, augmented epoch) and looked up by the
  batch's ``index``. Exact because the loaders replay an epoch's augmentation from (seed, epoch) and the
  teacher is frozen; shared between the jobs of a sweep through the cache.

The keys of the ``distill`` node read here (``teacher_outputs``, ``teachers``, ``teacher_weights``) are
not passed to the recipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from distill_runner import distributed
from distill_runner.distill.contract import Batch, Outputs, TeacherSignal
from distill_runner.errors import ConfigError
from distill_runner.models.features import FeatureTap
from distill_runner.train.engine import Precision

log = logging.getLogger(__name__)

SIGNAL_KEYS = ("teacher_outputs", "teachers", "teacher_weights")
TEACHER_OUTPUTS = ("cached", "online")


class OnlineTeacher:
    """The frozen teacher's forward pass on each training batch (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] = ()):
        self.model = model
        self.tap = FeatureTap(model, layers)

    def to(self, device: torch.device) -> OnlineTeacher:
        self.model.to(device).eval()
        return self

    def set_epoch(self, epoch: int) -> None:
        """The same teacher every epoch."""

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's graph
    def __call__(self, batch: Batch) -> Outputs:
        return self.tap(batch["image"])


class EnsembleTeacher:
    """Several frozen teachers: ``logits = sum_i w_i * logits_i / sum_i w_i`` (equal weights by default)."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None, layers: Sequence[str] = ()):
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        self.teachers = [OnlineTeacher(m, layers if i == 0 else ()) for i, m in enumerate(models)]
        self.weights = [w / sum(weights) for w in weights]

    def to(self, device: torch.device) -> EnsembleTeacher:
        for t in self.teachers:
            t.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        """The same teachers every epoch."""

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Outputs:
        used = [(t, w) for t, w in zip(self.teachers, self.weights) if w > 0 or t is self.teachers[0]]
        outs = [t(batch) for t, _ in used]
        out = dict(outs[0])
        out["logits"] = sum(w * o["logits"].float() for (_, w), o in zip(used, outs))
        return out


class ReplayedTeacher:
    """Teacher logits replayed from ``logits[view, index]`` ([views, N, classes]).

    Epoch ``e`` replays view ``e % views``; with one view per epoch it is exactly the online teacher
    on the same augmented batches (up to the storage dtype).
    """

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.view = 0

    def to(self, device: torch.device) -> ReplayedTeacher:
        self.logits = self.logits.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.logits.shape[0]

    def __call__(self, batch: Batch) -> Outputs:
        index = batch["index"].to(self.logits.device)
        return {"logits": self.logits[self.view, index].float()}


def online_signal(models: Sequence[nn.Module], weights: Sequence[float] | None = None, layers: Sequence[str] = ()):
    """The online signal for one teacher, or the weighted ensemble of several."""
    if len(models) == 1:
        return OnlineTeacher(models[0], layers)
    return EnsembleTeacher(models, weights, layers)


# ------------------------------------------------------------------------------- the distill node


def recipe_node(distill: DictConfig) -> DictConfig:
    """``distill`` without the keys read here: what the recipe is built from."""
    node = OmegaConf.to_container(distill, resolve=True)
    for key in SIGNAL_KEYS:
        node.pop(key, None)
    return OmegaConf.create(node)


def extra_teachers(distill: DictConfig) -> dict[str, DictConfig]:
    """``distill.teachers`` (multi-teacher recipes): config key -> teacher node."""
    teachers = {f"distill.teachers.{name}": node for name, node in (distill.get("teachers") or {}).items()}
    for key, node in teachers.items():
        if node.get("epochs", 1) == 0 and node.get("checkpoint") is None and node.get("weights") is None:
            fix = f"a teacher used as loaded needs {key}.checkpoint=PATH; or train it: {key}.epochs=3"
            raise ConfigError(f"{key}.epochs", 0, fix)
    return teachers


def teacher_weights(distill: DictConfig) -> list[float] | None:
    """``distill.teacher_weights`` in teacher order (the run's ``teacher`` first); None = average."""
    weights = distill.get("teacher_weights")
    if weights is None:
        return None
    names = ["teacher", *(distill.get("teachers") or {})]
    weights = OmegaConf.to_container(weights, resolve=True) if OmegaConf.is_config(weights) else weights
    valid = isinstance(weights, Mapping) and set(weights) == set(names)
    valid = valid and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights.values())
    if not valid or not sum(weights.values()) > 0:
        fix = f"use null (average) or a weight >= 0 for each teacher: {{{', '.join(f'{n}: 1.0' for n in names)}}}"
        raise ConfigError("distill.teacher_weights", weights, fix)
    return [float(weights[n]) for n in names]


# ------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Replay:
    """How the distill stage may replay teacher outputs (``distill.teacher_outputs``, ``cache.*``)."""

    mode: str  # cached | online
    epochs: int  # the students' epochs
    dtype: torch.dtype  # storage of the replayed logits
    max_mb: float  # above this, the teacher runs online
    progress: bool


def views_needed(train, epochs: int) -> int:
    """Distinct augmented epochs: one without random augmentation, else one per epoch."""
    return min(epochs, train.distinct_epochs or epochs)


def replay_blocker(recipe, train, replay: Replay, num_classes: int) -> str | None:
    """Why the teacher's outputs cannot be replayed for this stage, or None when they can."""
    if replay.mode == "online":
        return "distill.teacher_outputs=online"
    if not train.replayable:
        return "the training loader cannot replay its augmentation"
    if recipe.teacher_layers:
        return "the recipe needs teacher features, which are not cached"
    size_mb = views_needed(train, replay.epochs) * train.num_samples * num_classes * replay.dtype.itemsize / 2**20
    if size_mb > replay.max_mb:
        return f"they would take {size_mb:.0f} MB > cache.max_teacher_outputs_mb={replay.max_mb}"
    return None


@torch.inference_mode()
def compute_teacher_logits(teacher, train, views: int, device, precision: Precision, dtype, progress: bool = True):
    """The online signal's logits for every training image under the augmentation of epochs
    0..views-1 (the loader replays an epoch's augmentation from the seed): [views, N, classes]."""
    teacher = teacher.to(device)
    logits = filled = None
    total = views * len(train)
    show = progress and distributed.is_main()
    bar = tqdm(total=total, desc="teacher outputs", leave=False, disable=None if show else True, dynamic_ncols=True)
    for view in range(views):
        train.set_epoch(view)
        for batch in train:  # under torchrun: this process's shard
            with precision.autocast():
                out = teacher({"image": batch["image"].to(device, non_blocking=True)})["logits"].float()
            if logits is None:
                logits = torch.zeros(views, train.num_samples, out.shape[1], dtype=torch.float32)
                filled = torch.zeros(views, train.num_samples, dtype=torch.float32)
            logits[view, batch["index"].cpu()] = out.cpu()
            filled[view, batch["index"].cpu()] = 1.0
            bar.update()
    bar.close()
    if distributed.active():  # every process computed its shard: put them together
        logits, filled = distributed.sum_over_processes(logits), distributed.sum_over_processes(filled)
        logits = logits / filled.clamp_min(1)[..., None]  # shards overlap where the last one was padded
    return logits.to(dtype)


def distill_signal(
    online,
    recipe,
    data,
    replay: Replay,
    device,
    precision: Precision,
    fetch: Callable | None,
    key: Callable[[int], str],
) -> TeacherSignal | None:
    """The distill stage's teacher signal: None when the recipe needs no teacher; replayed where that
    is exact and fits ``replay.max_mb``; else ``online``. ``fetch(kind, key, build)`` is the cache's
    (None: no cache, compute here); ``key(views)`` the outputs' cache key."""
    if not recipe.needs_teacher:
        return None
    why_not = replay_blocker(recipe, data.train, replay, data.num_classes)
    if why_not is not None:
        log.info("teacher outputs: online (%s)", why_not)
        return online
    views = views_needed(data.train, replay.epochs)

    def build() -> dict:
        return {
            "logits": compute_teacher_logits(
                online, data.train, views, device, precision, replay.dtype, replay.progress
            )
        }

    start = time.perf_counter()
    entry, source = (build(), "computed") if fetch is None else fetch("teacher_outputs", key(views), build)
    logits = entry["logits"]
    size_mb = logits.numel() * logits.element_size() / 2**20
    log.info(
        "teacher outputs: cached, %d augmented views x %d images x %d classes as %s = %.1f MB, %s (%.1fs)",
        *logits.shape,
        str(logits.dtype).removeprefix("torch."),
        size_mb,
        source,
        time.perf_counter() - start,
    )
    return ReplayedTeacher(logits)
