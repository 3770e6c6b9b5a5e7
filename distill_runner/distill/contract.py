"""The contract every loss term, recipe and teacher signal meets, written once.

Data moves as dicts: a batch is ``{"image", "target", "index"}`` (``index``: the image's position in
its split, what replayed teacher outputs are looked up by); a model's outputs are ``{"logits",
"features": {module path: tensor}}`` (features only for the layers a recipe asked for).

Teacher features reach a term reduced by its own ``teacher_summary(layer, feature)`` (the feature
itself by default; attention transfer keeps only the attention map): the recipe turns a teacher
signal's raw ``features`` into ``summaries[term][layer]`` (:meth:`Recipe.summarize`), and each term
sees its own as ``teacher["features"][layer]``. Replay stores exactly those summaries, so online and
replayed teachers give a term the same tensors (up to the storage dtype).

Some methods train parts of their own before the student's training (AB initialises the student's
connectors, FT trains a paraphraser on teacher features): a term's ``prepare(student, batches, device)``
is that stage, run once by :func:`distill_runner.train.engine.fit` before the first epoch (not again on a
resume: the checkpoint holds what it trained). ``batches(epoch)`` yields ``(batch, teacher)`` on the device:
the training batches of that epoch and the teacher outputs the term sees in training (its summaries as
``teacher["features"]``, online or replayed alike; None without a teacher). It returns each epoch's mean
loss, which the recipe logs; its number of epochs is the term's own argument; by default it does nothing.

A term may change the model that ships (SimKD: the student predicts through a projector and the teacher's
frozen classifier, at inference too): its ``deployed(student)`` returns that model (the student itself by
default), built after the teacher's training. The runner trains, validates, checkpoints, evaluates and exports
it as the KD student (:meth:`~distill_runner.distill.recipe.Recipe.deployed`; at most one term of a recipe
overrides it). Its parameters are the model's: the term gives up any it held, so they train and save once.

A loss term declares what it needs as class attributes; :class:`Term` holds their defaults, and no
other module guesses them. The training loop, the runner and the teacher signal read these
attributes directly.

Docs: docs/reference/api.md
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from distill_runner.errors import ConfigError

Batch = dict[str, torch.Tensor]
Outputs = dict[str, Any]
PrepareBatches = Callable[[int], Iterable[tuple[Batch, Outputs | None]]]  # epoch -> (batch, teacher) pairs
HYPERPARAMETERS = ("temperature", "alpha", "beta")  # the recipe-level values terms may read


@dataclass(frozen=True)
class TermState:
    """What a term reads from its recipe at one step: the current (scheduled) hyperparameters,
    per-sample weights (class balance, teacher confidence; None when the recipe uses neither) and
    where training stands (``epoch`` of ``epochs``, for terms with their own curriculum)."""

    temperature: float
    alpha: float
    beta: float
    sample_weights: torch.Tensor | None = None
    epoch: int = 0
    epochs: int = 1


@runtime_checkable
class LossTerm(Protocol):
    """One named loss: ``term(batch, student_outputs, teacher_outputs, state) -> unweighted scalar``.

    Capabilities (declared as attributes; defaults in :class:`Term`):
    - ``needs_teacher``: reads teacher outputs (logits, or features at ``teacher_layers``);
    - ``teacher_summary(layer, feature)``: what it reads of a teacher feature (per sample, batch first);
      it receives that as ``teacher["features"][layer]``, online and replayed alike; replay stores it;
    - ``student_layers`` / ``teacher_layers``: module paths whose outputs it reads (known after ``bind``);
    - ``hyperparameters``: which of the recipe's temperature, alpha, beta it reads (logged per epoch);
    - ``mixes_alpha``: it weighs two losses by ``1 - alpha`` and ``alpha``, so alpha must lie in [0, 1];
    - ``weighs_samples``: it applies ``state.sample_weights`` per sample (class balance and teacher
      confidence act only on such terms; a recipe asking for them needs at least one);
    - ``task_loss``: it is the supervised task loss (cross-entropy with the labels), not a distillation term:
      an optimizer that moves the two gradients apart (DOT, :mod:`distill_runner.train.optimizers`) reads it;
    - trainable parameters (adapters, auxiliary heads): an ``nn.Module``'s own, trained with the student.
    Optional (a :class:`Term` has them; :func:`strong_augment` reads them): ``views = ("weak", "strong")``
    with ``strong_augment`` (a :class:`~distill_runner.data.strong_augment.StrongAugment`) asks the loader
    for a second, strongly augmented view: the batch gains ``image_strong``, the student's and the teacher's
    outputs ``strong_logits`` (their logits on it; replayed like the weak view's).
    ``bind`` sees the models and the data before training: check layer names, build adapters.
    ``logged`` returns values the term learns (a learned temperature), logged after each epoch.
    """

    needs_teacher: bool
    student_layers: tuple[str, ...]
    teacher_layers: tuple[str, ...]
    hyperparameters: tuple[str, ...]
    mixes_alpha: bool
    weighs_samples: bool
    task_loss: bool

    def bind(self, student: nn.Module, teacher: nn.Module | None, data: Any, key: str) -> None: ...

    def logged(self) -> dict[str, float]: ...

    def teacher_summary(self, layer: str, feature: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, batch: Batch, student: Outputs, teacher: Outputs | None, state: TermState) -> torch.Tensor: ...


class Term(nn.Module):
    """Base class of the shipped terms: the defaults of every capability, in one place."""

    needs_teacher: bool = True
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    hyperparameters: tuple[str, ...] = ()
    mixes_alpha: bool = False
    weighs_samples: bool = False
    views: tuple[str, ...] = ("weak",)  # ("weak", "strong"): also the strong view (see LossTerm)
    strong_augment: Any = None  # its StrongAugment, when views holds "strong"
    task_loss: bool = False

    def bind(self, student: nn.Module, teacher: nn.Module | None, data: Any, key: str) -> None:
        """Nothing to check or build by default."""

    def logged(self) -> dict[str, float]:
        """Nothing learned to log by default."""
        return {}

    def prepare(self, student: nn.Module, batches: PrepareBatches, device: torch.device) -> list[float]:
        """No stage before training by default (AB, FT have one): returns each epoch's mean loss."""
        return []

    def deployed(self, student: nn.Module) -> nn.Module:
        """The model that ships as the KD student: the student itself by default (SimKD adds its projector and
        the teacher's frozen head)."""
        return student

    def teacher_summary(self, layer: str, feature: torch.Tensor) -> torch.Tensor:
        """The teacher feature itself by default. Override it to keep less (replay stores what it
        returns): it must be a function of ``feature`` alone, per sample; a term that overrides it has
        its ``_target_`` and arguments in the replayed outputs' cache key."""
        return feature


def strong_augment(recipe: Any):
    """The strong view a recipe's terms ask for, or None: the stage's batches then carry ``image_strong``
    and its models' outputs ``strong_logits``. Terms asking for different ones: a ConfigError."""
    asked = {
        term.strong_augment for term in getattr(recipe, "terms", {}).values() if "strong" in getattr(term, "views", ())
    }
    if len(asked) > 1:
        fix = (
            f"the terms ask for different strong views ({sorted(map(str, asked))}): give them the same strong: {{...}}"
        )
        raise ConfigError("distill.terms", "strong", fix)
    return next(iter(asked), None)


@runtime_checkable
class TeacherSignal(Protocol):
    """What the distillation loop gets from the teacher for a batch: online (the frozen teacher's
    forward pass: ``{"logits", "features"}``), an ensemble of teachers, or replayed from cached outputs
    (``{"logits", "summaries": {term: {layer: tensor}}}``, the terms' teacher summaries as stored)
    (:mod:`distill_runner.distill.signals`). ``set_epoch`` is called before each epoch."""

    def to(self, device: torch.device) -> TeacherSignal: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __call__(self, batch: Batch) -> Outputs: ...
