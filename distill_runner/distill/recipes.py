"""Composable, scheduled loss recipes: a recipe is a list of weighted terms.

    loss = sum_k weight_k(epoch) * term_k(batch, student outputs, teacher outputs)

``conf/distill/*.yaml`` (all but ``kd``, the fixed classic form in :mod:`distill_runner.distill.losses`)
configure a :class:`Recipe`:

    _target_: distill_runner.distill.recipes.Recipe
    temperature: 4.0
    alpha: 0.5
    terms:                      # name -> {type (default: the name), weight, the term's own keys}
      ce: {weight: 1-alpha}     # a number, or alpha / 1-alpha (tied to distill.alpha and its schedule)
      kd: {weight: alpha}
      feature: {weight: 1.0, pairs: [{student: features.1, teacher: layer3}]}
    schedule: {alpha: {kind: linear, start: 0, ramp: 0.5}}    # see distill_runner.distill.schedules
    sample_weighting: null      # null | teacher_confidence
    class_balance: null         # null | inverse_frequency | effective_number

Term types: see :data:`distill_runner.distill.terms.TERM_TYPES`. Adapters and auxiliary heads are
parameters of the recipe (an ``nn.Module``): trained with the student, never part of its checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_runner.distill.schedules import Schedule, parse_schedule
from distill_runner.distill.terms import BALANCE_METHODS, TERM_TYPES, class_balance_weights, teacher_confidence_weights
from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)

TIED = {"alpha": lambda a: a, "1-alpha": lambda a: 1 - a}
SAMPLE_WEIGHTING = ("teacher_confidence",)
PER_SAMPLE_TERMS = ("kd", "dkd")


def _plain(value):
    return (
        OmegaConf.to_container(value, resolve=True)
        if isinstance(value, (DictConfig,)) or OmegaConf.is_list(value)
        else value
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Recipe(nn.Module):
    def __init__(
        self,
        terms,
        temperature: float = 4.0,
        alpha: float = 0.5,
        beta: float = 1.0,
        schedule=None,
        sample_weighting: str | None = None,
        class_balance: str | None = None,
        class_balance_beta: float = 0.999,
        label_smoothing: float = 0.0,
        class_weights=None,
    ):
        super().__init__()
        terms = _plain(terms)
        if isinstance(terms, list):  # the list form: [{name: ce, weight: 1-alpha}, ...]
            terms = {t.get("name", t.get("type")): {k: v for k, v in t.items() if k != "name"} for t in terms}
        if not isinstance(terms, Mapping) or not terms:
            raise ConfigError(
                "terms", terms, "give at least one term, e.g. {ce: {weight: 1-alpha}, kd: {weight: alpha}}"
            )
        if not _is_number(temperature) or not temperature > 0:
            raise ConfigError("temperature", temperature, "must be a number > 0 (typical values 1-8)")
        if not _is_number(beta) or beta < 0:
            raise ConfigError("beta", beta, "must be a number >= 0")
        self.targets = {"temperature": float(temperature), "alpha": float(alpha), "beta": float(beta)}
        self.terms = nn.ModuleDict()
        self.weight_specs: dict[str, object] = {}
        self.types: dict[str, str] = {}
        for name, spec in terms.items():
            spec = dict(spec or {})
            kind = spec.pop("type", name)
            weight = spec.pop("weight", 1.0)
            if kind not in TERM_TYPES:
                raise ConfigError(f"terms.{name}.type", kind, f"use one of {', '.join(TERM_TYPES)}")
            if not (_is_number(weight) or weight in TIED):
                raise ConfigError(f"terms.{name}.weight", weight, "use a number, alpha or 1-alpha")
            if kind == "ce":
                spec = {"label_smoothing": label_smoothing, "class_weights": class_weights, **spec}
            try:
                self.terms[name] = TERM_TYPES[kind](**spec)
            except ConfigError as exc:
                raise exc.under(f"terms.{name}") from None
            except TypeError as exc:
                raise ConfigError(f"terms.{name}", spec, f"bad keys for a {kind} term ({exc})") from None
            self.weight_specs[name], self.types[name] = weight, kind
        uses_alpha = any(w in TIED for w in self.weight_specs.values()) or "self" in self.types.values()
        if not _is_number(alpha) or (uses_alpha and not 0 <= alpha <= 1) or alpha < 0:
            raise ConfigError(
                "alpha",
                alpha,
                "must be in [0, 1]: the weight of the KD term (1 - alpha weights cross-entropy)"
                if uses_alpha
                else "must be a number >= 0",
            )

        self.schedules: dict[str, Schedule] = {}
        for name, spec in (_plain(schedule) or {}).items():
            if name not in {"temperature", "alpha", "beta", *self.terms}:
                raise ConfigError(
                    f"schedule.{name}",
                    spec,
                    f"schedule alpha, temperature, beta or a term weight: {', '.join(self.terms)}",
                )
            self.schedules[name] = parse_schedule(spec, f"schedule.{name}")
            if name == "temperature" and self.schedules[name].kind != "constant" and not self.schedules[name].start > 0:
                raise ConfigError(
                    "schedule.temperature.start",
                    self.schedules[name].start,
                    "a temperature schedule needs start > 0, e.g. {kind: linear, start: 8}",
                )

        if sample_weighting not in (None, *SAMPLE_WEIGHTING):
            raise ConfigError(
                "sample_weighting",
                sample_weighting,
                "use null or teacher_confidence (weight each sample's KD term by the teacher's probability of its true class)",
            )
        if class_balance not in (None, *BALANCE_METHODS):
            raise ConfigError("class_balance", class_balance, f"use null, {' or '.join(BALANCE_METHODS)}")
        if not _is_number(class_balance_beta) or not 0 < class_balance_beta < 1:
            raise ConfigError("class_balance_beta", class_balance_beta, "use a number in (0, 1), e.g. 0.999 or 0.9999")
        self.sample_weighting, self.class_balance, self.class_balance_beta = (
            sample_weighting,
            class_balance,
            float(class_balance_beta),
        )
        self.register_buffer("class_weight", None)
        self.current: dict[str, float] = {}
        self.set_epoch(0, 1)

    # -- what the runner and the loop ask for
    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values()) or self.sample_weighting is not None

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.terms.values() for n in t.student_layers))

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.terms.values() for n in t.teacher_layers))

    def bind(self, student: nn.Module, teacher: nn.Module | None, data) -> None:
        """Check layer names and build adapters/heads for these models (architecture only)."""
        for name, term in self.terms.items():
            term.bind(student, teacher, data, f"terms.{name}")
        if self.class_balance is not None:
            counts = data.class_counts.get("train")
            if not counts:
                raise ConfigError(
                    "class_balance",
                    self.class_balance,
                    "the data set reports no training class counts (DataBundle.class_counts['train'])",
                )
            self.class_weight = class_balance_weights(counts, self.class_balance, self.class_balance_beta)
            log.info(
                "class-balanced KD (%s): class weights %s",
                self.class_balance,
                [round(w, 3) for w in self.class_weight.tolist()],
            )

    def set_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Current alpha, temperature, beta and term weights; logged as schedule/<name>."""
        cur = {
            k: self.schedules[k].value(v, epoch, epochs) if k in self.schedules else v for k, v in self.targets.items()
        }
        for name, spec in self.weight_specs.items():
            base = TIED[spec](cur["alpha"]) if spec in TIED else float(spec)
            cur[f"weight/{name}"] = self.schedules[name].value(base, epoch, epochs) if name in self.schedules else base
        self.current = cur
        shown = {"temperature": cur["temperature"]}
        if any(k in ("kd", "dkd", "self") for k in self.types.values()):
            shown["alpha"] = cur["alpha"]
        if "dkd" in self.types.values():
            shown["beta"] = cur["beta"]
        return {**shown, **{k: v for k, v in cur.items() if k.startswith("weight/")}}

    def _sample_weights(self, batch, teacher) -> torch.Tensor | None:
        w = None
        if self.class_weight is not None:
            w = self.class_weight.to(batch["target"].device)[batch["target"]]
        if self.sample_weighting == "teacher_confidence":
            conf = teacher_confidence_weights(teacher["logits"], batch["target"])
            w = conf if w is None else w * conf
        return w

    def forward(self, batch, student, teacher=None) -> dict[str, torch.Tensor]:
        cur = self.current
        state = {
            "temperature": cur["temperature"],
            "alpha": cur["alpha"],
            "beta": cur["beta"],
            "sample_weights": self._sample_weights(batch, teacher),
        }
        out = {}
        for name, term in self.terms.items():
            weight = cur[f"weight/{name}"]
            if (
                weight == 0
                and name not in self.schedules
                and not (self.weight_specs[name] in TIED and "alpha" in self.schedules)
            ):
                continue
            out[name] = weight * term(batch, student, teacher, state)
        return out


def split_distill_node(node: DictConfig) -> tuple[DictConfig, dict[str, DictConfig], dict | None]:
    """The recipe's own config, the extra teachers (``teachers``: key -> teacher node) and their
    ``teacher_weights``; the extra keys are not passed to the recipe."""
    extra = OmegaConf.select(node, "teachers", default=None) or {}
    weights = OmegaConf.select(node, "teacher_weights", default=None)
    own = (
        OmegaConf.masked_copy(node, [k for k in node.keys() if k not in ("teachers", "teacher_weights")])
        if extra or "teacher_weights" in node
        else node
    )
    teachers = {f"distill.teachers.{name}": sub for name, sub in extra.items()}
    for key, sub in teachers.items():
        if sub.get("epochs", 1) == 0 and sub.get("checkpoint") is None and sub.get("weights") is None:
            raise ConfigError(
                f"{key}.epochs", 0, f"a teacher used as loaded needs {key}.checkpoint=PATH; or train it: {key}.epochs=3"
            )
    names = ["teacher", *(k.rsplit(".", 1)[1] for k in teachers)]
    if weights is not None:
        weights = _plain(weights)
        if (
            not isinstance(weights, Mapping)
            or set(weights) != set(names)
            or not all(_is_number(w) and w >= 0 for w in weights.values())
            or not sum(weights.values()) > 0
        ):
            raise ConfigError(
                "distill.teacher_weights",
                weights,
                f"use null (average) or a weight >= 0 for each teacher: {{{', '.join(f'{n}: 1.0' for n in names)}}}",
            )
        weights = [float(weights[n]) for n in names]
    return own, teachers, weights


def bind(recipe, student: nn.Module, teacher_architecture: Callable[[], nn.Module], data) -> None:
    """``recipe.bind`` (if it has one) with errors under ``distill.``; logs the recipe's own parameters.

    ``teacher_architecture`` builds an untrained teacher: names and shapes are all a recipe needs,
    so a wrong layer name fails before the teacher is fine-tuned."""
    if not hasattr(recipe, "bind"):
        return
    try:
        recipe.bind(student, teacher_architecture(), data)
    except ConfigError as exc:
        raise exc.under("distill") from None
    if isinstance(recipe, nn.Module):
        n = sum(p.numel() for p in recipe.parameters())
        if n:
            log.info(
                "recipe adds %s trainable parameters (adapters/heads): trained with the student, not part of it",
                f"{n:,}",
            )
