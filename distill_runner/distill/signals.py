"""Teacher signals, and the one place that decides where a stage's teacher signal comes from.

- online: the frozen teacher's forward pass on each training batch (eval mode, no gradients);
- ensemble: several teachers, logits averaged with weights (features from the first, the run's ``teacher``);
- replayed: the online signal's logits, and the recipe's teacher summaries of its features (each
  term's ``teacher_summary``: the feature maps for FitNets, only the attention maps for attention
  transfer), computed once per (image, augmented epoch) and looked up by the batch's ``index``. Exact
  because the loaders replay an epoch's augmentation from (seed, epoch) and the teacher is frozen;
  shared between the jobs of a sweep through the cache. Its size is estimated before anything is
  computed; above ``cache.max_teacher_outputs_mb`` the teacher runs online.

The keys of the ``distill`` node read here (``teacher_outputs``, ``teachers``, ``teacher_weights``) are
not passed to the recipe.

Docs: docs/guide/sweeps-and-cache.md
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_runner import distributed
from distill_runner.distill.contract import Batch, Outputs, TeacherSignal, strong_augment
from distill_runner.errors import ConfigError
from distill_runner.io.cache import Cache, teacher_outputs_key
from distill_runner.models.features import FeatureTap
from distill_runner.precision import Precision
from distill_runner.schema import parse, plain
from distill_runner.spec import DistillSpec, RunSpec, TeacherSpec

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
        out = self.tap(batch["image"])
        if "image_strong" in batch:  # a term asked for the strong view: the teacher's logits on it
            out["strong_logits"] = self.tap(batch["image_strong"])["logits"]
        return out


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
        for key in {"logits", "strong_logits"} & set(out):
            out[key] = sum(w * o[key].float() for (_, w), o in zip(used, outs))
        return out


class ReplayedTeacher:
    """Teacher outputs replayed from ``[view, index]``: logits ``[views, N, classes]`` and the recipe's
    teacher summaries ``{term: {layer: [views, N, ...]}}`` (what :meth:`Recipe.summarize` made of the
    online teacher's features), returned as float32.

    Epoch ``e`` replays view ``e % views``; with one view per epoch it is exactly the online teacher
    on the same augmented batches (up to the storage dtype). ``strong_logits`` (same shape as ``logits``):
    the teacher's logits on each epoch's strong view, when a term asked for one.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        summaries: dict[str, dict[str, torch.Tensor]] | None = None,
        strong_logits: torch.Tensor | None = None,
    ):
        self.logits, self.summaries, self.strong_logits = logits, summaries or {}, strong_logits
        self.view = 0

    def to(self, device: torch.device) -> ReplayedTeacher:
        self.logits = self.logits.to(device)
        self.strong_logits = None if self.strong_logits is None else self.strong_logits.to(device)
        self.summaries = {t: {k: v.to(device) for k, v in layers.items()} for t, layers in self.summaries.items()}
        return self

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.logits.shape[0]

    def __call__(self, batch: Batch) -> Outputs:
        index = batch["index"].to(self.logits.device)
        look_up = lambda stored: stored[self.view].index_select(0, index).float()
        out = {
            "logits": look_up(self.logits),
            "summaries": {t: {k: look_up(v) for k, v in layers.items()} for t, layers in self.summaries.items()},
        }
        if self.strong_logits is not None:
            out["strong_logits"] = look_up(self.strong_logits)
        return out


def online_signal(models: Sequence[nn.Module], weights: Sequence[float] | None = None, layers: Sequence[str] = ()):
    """The online signal for one teacher, or the weighted ensemble of several."""
    if len(models) == 1:
        return OnlineTeacher(models[0], layers)
    return EnsembleTeacher(models, weights, layers)


# ------------------------------------------------------------------------------- the distill node


def _typed(distill) -> DistillSpec:
    """The ``distill`` node, typed (a script's or a test's composed node is read against the schema)."""
    return distill if isinstance(distill, DistillSpec) else parse(DistillSpec, distill, "distill")


def recipe_node(distill: DistillSpec) -> dict:
    """``distill`` without the keys read here: what the recipe is built from (plain values, resolved)."""
    node = plain(distill)
    for key in SIGNAL_KEYS:
        node.pop(key, None)
    return node


def extra_teachers(distill: DistillSpec) -> dict[str, TeacherSpec]:
    """``distill.teachers`` (multi-teacher recipes): config key -> teacher node."""
    teachers = {f"distill.teachers.{name}": node for name, node in _typed(distill).teachers.items()}
    for key, node in teachers.items():
        if node.epochs == 0 and node.checkpoint is None and node.weights is None:
            fix = f"a teacher used as loaded needs {key}.checkpoint=PATH; or train it: {key}.epochs=3"
            raise ConfigError(f"{key}.epochs", 0, fix)
    return teachers


def teacher_weights(distill: DistillSpec) -> list[float] | None:
    """``distill.teacher_weights`` in teacher order (the run's ``teacher`` first); None = average."""
    distill = _typed(distill)
    weights = distill.teacher_weights
    if weights is None:
        return None
    names = ["teacher", *distill.teachers]
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


def replay_blocker(train, replay: Replay, estimate_mb: Callable[[], float]) -> str | None:
    """Why the teacher's outputs cannot be replayed for this stage, or None when they can;
    ``estimate_mb()``: the size they would take (asked last: it runs the teacher once)."""
    if replay.mode == "online":
        return "distill.teacher_outputs=online"
    if not train.replayable:
        return "the training loader cannot replay its augmentation"
    size_mb = estimate_mb()
    if size_mb > replay.max_mb:
        return (
            f"they would take {size_mb:.2f} MB > cache.max_teacher_outputs_mb={replay.max_mb}; raise it to replay them"
        )
    return None


def _stored_in_words(entry: Outputs) -> str:
    """What a teacher-outputs entry holds per image, e.g. ``10 logits + attention/layer2 8x8``."""
    shapes = {"/".join(name): tuple(value.shape[2:]) for name, value in _tensors(entry)}
    return " + ".join(f"{s[0]} logits" if n == "logits" else f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())


def _tensors(outputs: Outputs) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    """What replay stores of one batch's (summarized) teacher outputs: ``("logits",)`` and ``(term, layer)``."""
    yield ("logits",), outputs["logits"]
    if "strong_logits" in outputs:
        yield ("strong_logits",), outputs["strong_logits"]
    for term, layers in outputs.get("summaries", {}).items():
        for layer, value in layers.items():
            yield (term, layer), value


@torch.no_grad()
def stored_shapes(teacher, summarize: Callable[[Outputs], Outputs], train, device) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of what replay stores, ``{"logits": (classes,), "<term>/<layer>": (...)}``: the
    teacher and ``summarize`` (the recipe's) on two images of the first batch, before anything is computed."""
    first = next(iter(train))
    out = summarize(teacher.to(device)({k: v[:2].to(device) for k, v in first.items() if k.startswith("image")}))
    return {"/".join(name): tuple(value.shape[1:]) for name, value in _tensors(out)}


def store_mb(shapes: Mapping[str, Sequence[int]], views: int, images: int, dtype: torch.dtype) -> float:
    """MB (2**20 bytes) of ``views x images`` of each shape in ``dtype``."""
    return views * images * sum(math.prod(s) for s in shapes.values()) * dtype.itemsize / 2**20


@torch.inference_mode()
def compute_teacher_outputs(
    teacher, train, views: int, device, precision: Precision, dtype, progress: bool = True, summarize=None
) -> dict:
    """The online signal's outputs for every training image under the augmentation of epochs 0..views-1
    (the loader replays an epoch's augmentation from the seed), in ``dtype``: ``{"logits": [views, N,
    classes], "summaries": {term: {layer: [views, N, ...]}}}``. ``summarize`` (the recipe's) reduces the
    teacher's features to what each term reads, under the same autocast as training; without it, logits alone."""
    teacher = teacher.to(device)
    stored: dict[tuple[str, ...], torch.Tensor] = {}
    filled = torch.zeros(views, train.num_samples, dtype=torch.float32)
    total = views * len(train)
    show = progress and distributed.is_main()
    bar = tqdm(total=total, desc="teacher outputs", leave=False, disable=None if show else True, dynamic_ncols=True)
    for view in range(views):
        train.set_epoch(view)
        for batch in train:  # under torchrun: this process's shard
            with precision.autocast():  # the weak view, and the strong one where the loader gives it
                out = teacher({k: v.to(device, non_blocking=True) for k, v in batch.items() if k.startswith("image")})
                out = (
                    summarize(out)
                    if summarize is not None
                    else {k: out[k] for k in ("logits", "strong_logits") if k in out}
                )
            index = batch["index"].cpu()
            for name, value in _tensors(out):
                if name not in stored:
                    stored[name] = torch.zeros(views, train.num_samples, *value.shape[1:], dtype=dtype)
                stored[name][view, index] = value.detach().to(dtype).cpu()
            filled[view, index] = 1.0
            bar.update()
    bar.close()
    if distributed.active():  # every process computed its shard: put them together, a view at a time
        filled = distributed.sum_over_processes(filled).clamp_min(1)  # shards overlap where the last one was padded
        for value in stored.values():
            for view in range(views):
                shape = (-1, *[1] * (value.ndim - 2))
                value[view] = (distributed.sum_over_processes(value[view]) / filled[view].view(shape)).to(dtype)
    summaries: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in stored.items():
        if len(name) == 2:
            summaries.setdefault(name[0], {})[name[1]] = value
    strong = {"strong_logits": stored[("strong_logits",)]} if ("strong_logits",) in stored else {}
    return {"logits": stored[("logits",)], "summaries": summaries, **strong}


class TeacherSignalSource:
    """The one place that decides where the distill stage's teacher signal comes from: none (the recipe needs
    no teacher), replayed (logits and the recipe's teacher summaries, from the cache or computed here) where
    that is exact and fits ``cache.max_teacher_outputs_mb``, else online (one teacher or the weighted ensemble).
    Built once with what it needs; the runner asks :meth:`signal`."""

    def __init__(self, spec: RunSpec, recipe, data, teachers: Sequence[nn.Module], teacher_keys: list[str],
                 cache: Cache | None, device: torch.device, precision: Precision):  # fmt: skip
        self.spec, self.recipe, self.data, self.teacher_keys = spec, recipe, data, teacher_keys
        self.cache, self.device, self.precision = cache, device, precision
        self.online = online_signal(teachers, spec.distill.weights, recipe.teacher_layers) if teachers else None
        self.replay = Replay(
            mode=spec.distill.teacher_outputs,
            epochs=spec.trainer.epochs,
            dtype=getattr(torch, spec.cache.teacher_outputs_dtype),
            max_mb=spec.cache.max_teacher_outputs_mb,
            progress=spec.trainer.progress,
        )
        self.shapes: dict[str, tuple[int, ...]] = {}  # per-image shapes of what replay stores, once estimated

    @functools.cached_property
    def views(self) -> int:
        """Distinct augmented epochs to replay (asked only of a recipe that needs a teacher)."""
        return views_needed(self.data.train, self.replay.epochs)

    def key(self) -> str:
        """The cache key of the replayed outputs (the teachers, the data, the views, what is stored besides logits)."""
        summaries = stored_spec(self.recipe)
        return teacher_outputs_key(self.spec, self.teacher_keys, self.data.fingerprint, self.views, summaries)

    def estimate_mb(self) -> float:
        """The size the replayed outputs take: a stored entry's file (a sweep's later job: no teacher pass to
        estimate what is already there), else estimated from the teacher run on two images."""
        stored = self.cache.stored_mb("teacher_outputs", self.key()) if self.cache is not None else None
        if stored is not None:
            return stored
        self.shapes.update(stored_shapes(self.online, self.recipe.summarize, self.data.train, self.device))
        return store_mb(self.shapes, self.views, self.data.train.num_samples, self.replay.dtype)

    def signal(self) -> TeacherSignal | None:
        """The distill stage's teacher signal (the decision and its source said in the log)."""
        if not self.recipe.needs_teacher:
            return None
        self.data.train.set_strong(strong_augment(self.recipe))  # a term's strong view: replayed as the weak one
        why_not = replay_blocker(self.data.train, self.replay, self.estimate_mb)
        if why_not is not None:
            log.info("teacher outputs: online (%s)", why_not)
            return self.online
        start = time.perf_counter()
        if self.cache is None:
            entry, source = self.compute(), "computed"
        else:
            entry, source = self.cache.fetch("teacher_outputs", self.key(), self.compute)
        self._say(entry, source, time.perf_counter() - start)
        return ReplayedTeacher(entry["logits"], entry.get("summaries", {}), entry.get("strong_logits"))

    def compute(self) -> dict:
        """The replayed outputs, computed: the online signal on every view of every training image."""
        replay = self.replay
        return compute_teacher_outputs(self.online, self.data.train, self.views, self.device, self.precision,
                                       replay.dtype, replay.progress, self.recipe.summarize)  # fmt: skip

    def _say(self, entry: dict, source: str, seconds: float) -> None:
        logits = entry["logits"]
        size_mb = sum(v.numel() * v.element_size() for _, v in _tensors(entry)) / 2**20
        what = _stored_in_words(entry)  # ``shapes`` stays empty when a stored entry's size spared the estimate
        estimate = store_mb(self.shapes, self.views, self.data.train.num_samples, self.replay.dtype)
        estimated = (
            f"estimated {estimate:.2f} MB" if self.shapes else "its stored file's size checked against the limit"
        )
        log.info(
            "teacher outputs: cached, %d augmented views x %d images x (%s) as %s = %.2f MB (%s), %s (%.1fs)",
            *logits.shape[:2],
            what,
            str(logits.dtype).removeprefix("torch."),
            size_mb,
            estimated,
            source,
            seconds,
        )


def stored_spec(recipe) -> dict:
    """What replay stores besides the weak view's logits, for the cache key: the recipe's teacher summaries
    (:meth:`Recipe.summary_spec`) and, when a term asks for it, the strong view (its logits per epoch)."""
    strong = strong_augment(recipe)
    return recipe.summary_spec() | ({"<strong view>": strong.spec()} if strong is not None else {})
