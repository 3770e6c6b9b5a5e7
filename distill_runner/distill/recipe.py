"""A recipe: named, weighted loss terms, with per-epoch schedules. One class serves every stage.

    loss = sum_k weight_k(epoch) * term_k(batch, student outputs, teacher outputs, state)

``conf/distill/*.yaml`` configure it; each term is named by its ``_target_``::

    _target_: distill_runner.distill.Recipe
    temperature: 4.0
    alpha: 0.5
    terms:                      # name -> {_target_, weight, the term's own keys}
      ce: {_target_: distill_runner.distill.terms.CrossEntropy, weight: 1-alpha}
      kd: {_target_: distill_runner.distill.terms.HintonKD, weight: alpha}
    schedule: {alpha: {kind: linear, start: 0, ramp: 0.5}}    # see distill_runner.distill.schedules
    sample_weighting: null      # null | teacher_confidence
    class_balance: null         # null | inverse_frequency | effective_number

A weight is a number, or ``alpha`` / ``1-alpha`` (tied to alpha and its schedule). Every recipe
hyperparameter is validated here, once. Adapters and auxiliary heads are parameters of the recipe
(an ``nn.Module``): trained with the student, never part of its checkpoint.

Docs: docs/guide/recipes.md
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from distill_runner.distill.contract import HYPERPARAMETERS, LossTerm, Outputs, Term, TermState
from distill_runner.distill.schedules import Schedule, parse_schedule
from distill_runner.distill.weighting import (
    CLASS_BALANCE,
    SAMPLE_WEIGHTING,
    class_balance_weights,
    teacher_confidence_weights,
)
from distill_runner.errors import ConfigError, instantiate
from distill_runner.schema import is_number

log = logging.getLogger(__name__)

TIED = {"alpha": lambda a: a, "1-alpha": lambda a: 1 - a}
CROSS_ENTROPY = {"_target_": "distill_runner.distill.terms.CrossEntropy"}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


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
    ):
        super().__init__()
        terms = _plain(terms)
        if isinstance(terms, list):  # the list form: [{name: ce, _target_: ..., weight: 1-alpha}, ...]
            terms = {t.get("name"): {k: v for k, v in t.items() if k != "name"} for t in terms}
        if not isinstance(terms, Mapping) or not terms:
            raise ConfigError("terms", terms, "give at least one term, e.g. {ce: {_target_: ...CrossEntropy}}")
        if not is_number(temperature) or not temperature > 0:
            raise ConfigError("temperature", temperature, "must be a finite number > 0 (typical values 1-8), e.g. 4")
        if not is_number(beta) or beta < 0:
            raise ConfigError("beta", beta, "must be a finite number >= 0")
        self.targets = {"temperature": float(temperature), "alpha": alpha, "beta": float(beta)}
        self.terms = nn.ModuleDict()
        self.weight_specs: dict[str, object] = {}
        self.term_specs: dict[str, dict] = {}  # what each term was built from (its weight aside)
        for name, spec in terms.items():
            self.term_specs[name] = dict(spec or {})
            self.terms[name], self.weight_specs[name] = self._build_term(name, self.term_specs[name])
        self._check_alpha(alpha)
        self.targets["alpha"] = float(alpha)
        self.schedules = self._parse_schedules(_plain(schedule) or {})
        if sample_weighting not in (None, *SAMPLE_WEIGHTING):
            fix = "use null or teacher_confidence (weight each sample's KD term by the teacher's p(true class))"
            raise ConfigError("sample_weighting", sample_weighting, fix)
        if class_balance not in (None, *CLASS_BALANCE):
            raise ConfigError("class_balance", class_balance, f"use null, {' or '.join(CLASS_BALANCE)}")
        if not is_number(class_balance_beta) or not 0 < class_balance_beta < 1:
            raise ConfigError("class_balance_beta", class_balance_beta, "use a number in (0, 1), e.g. 0.999 or 0.9999")
        self.sample_weighting, self.class_balance = sample_weighting, class_balance
        weighed = [name for name, t in self.terms.items() if t.weighs_samples]
        if (sample_weighting or class_balance) and not weighed:
            key = "sample_weighting" if sample_weighting else "class_balance"
            value = sample_weighting or class_balance
            fix = "no term of this recipe weighs samples (kd and dkd do); add one or set null"
            raise ConfigError(key, value, fix)
        if sample_weighting or class_balance:
            log.info("per-sample weights (%s) apply to: %s", sample_weighting or class_balance, ", ".join(weighed))
        self.class_balance_beta = float(class_balance_beta)
        self.register_buffer("class_weight", None)
        self.current: dict[str, float] = {}
        self.set_epoch(0, 1)

    @classmethod
    def cross_entropy(cls, label_smoothing: float = 0.0) -> Recipe:
        """Supervised training alone: the teacher's fine-tune (``teacher.label_smoothing``) and the scratch baseline."""
        smoothing = {"label_smoothing": float(label_smoothing)} if label_smoothing else {}
        return cls({"ce": {**CROSS_ENTROPY, **smoothing}})

    @classmethod
    def hinton(cls, temperature: float = 4.0, alpha: float = 0.5) -> Recipe:
        """Classic KD, as ``conf/distill/kd.yaml``: ``(1 - alpha) * CE + alpha * KD``."""
        kd = {"_target_": "distill_runner.distill.terms.HintonKD", "weight": "alpha"}
        return cls({"ce": {**CROSS_ENTROPY, "weight": "1-alpha"}, "kd": kd}, temperature=temperature, alpha=alpha)

    @staticmethod
    def _build_term(name: str, spec: dict) -> tuple[LossTerm, object]:
        weight = spec.pop("weight", 1.0)
        if not (is_number(weight) or weight in TIED):
            raise ConfigError(f"terms.{name}.weight", weight, "use a finite number, alpha or 1-alpha")
        if "_target_" not in spec:
            fix = "name the term's class, e.g. _target_: distill_runner.distill.terms.HintonKD"
            raise ConfigError(f"terms.{name}._target_", None, fix)
        term = instantiate(spec, f"terms.{name}", _convert_="all")
        if not isinstance(term, nn.Module) or not isinstance(term, LossTerm):
            fix = "not a loss term: subclass distill_runner.distill.contract.Term (see the README, 'Add your own loss')"
            raise ConfigError(f"terms.{name}._target_", spec["_target_"], fix)
        return term, weight

    def _check_alpha(self, alpha) -> None:
        is_share = any(w in TIED for w in self.weight_specs.values()) or any(t.mixes_alpha for t in self.terms.values())
        if is_share and not (is_number(alpha) and 0 <= alpha <= 1):
            fix = "must be in [0, 1]: the weight of the KD term (1 - alpha weights cross-entropy), e.g. 0.5"
            raise ConfigError("alpha", alpha, fix)
        if not is_number(alpha) or alpha < 0:
            raise ConfigError("alpha", alpha, "must be a finite number >= 0")

    def _parse_schedules(self, schedule: Mapping) -> dict[str, Schedule]:
        schedules = {}
        for name, spec in schedule.items():
            if name not in {*HYPERPARAMETERS, *self.terms}:
                fix = f"schedule alpha, temperature, beta or a term weight: {', '.join(self.terms)}"
                raise ConfigError(f"schedule.{name}", spec, fix)
            schedules[name] = parse_schedule(spec, f"schedule.{name}")
            if name == "temperature" and schedules[name].kind != "constant" and not schedules[name].start > 0:
                fix = "a temperature schedule needs start > 0, e.g. {kind: linear, start: 8}"
                raise ConfigError("schedule.temperature.start", schedules[name].start, fix)
        return schedules

    # -- what the runner and the loop ask for
    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values()) or self.sample_weighting is not None

    @property
    def task_terms(self) -> tuple[str, ...]:
        """The terms that are the supervised task loss (``task_loss``: cross-entropy); the others distill."""
        return tuple(name for name, t in self.terms.items() if t.task_loss)

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.terms.values() for n in t.student_layers))

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.terms.values() for n in t.teacher_layers))

    def summary_spec(self) -> dict[str, dict]:
        """What the teacher summaries depend on, for the replayed outputs' cache key: per term that reads
        teacher features, its layers and its reduction (``identity``, or the term's ``_target_`` and
        arguments when it overrides ``teacher_summary``)."""
        return {
            name: {
                "layers": list(term.teacher_layers),
                "summary": "identity" if type(term).teacher_summary is Term.teacher_summary else self.term_specs[name],
            }
            for name, term in self.terms.items()
            if term.teacher_layers
        }

    def summarize(self, teacher: Outputs | None) -> Outputs | None:
        """Teacher outputs as the terms read them: each term's ``teacher_summary`` of the raw ``features``
        at its layers, as ``summaries[term][layer]``. Replayed outputs hold the summaries this returned
        when they were computed; they pass unchanged."""
        if teacher is None or "summaries" in teacher:
            return teacher
        features = teacher.get("features", {})
        out = {k: v for k, v in teacher.items() if k != "features"}
        out["summaries"] = {
            name: {layer: term.teacher_summary(layer, features[layer]) for layer in term.teacher_layers}
            for name, term in self.terms.items()
            if term.teacher_layers
        }
        return out

    def deploying_terms(self) -> list[str]:
        """The terms that change the model that ships (override :meth:`Term.deployed`)."""
        overrides = lambda t: getattr(type(t), "deployed", Term.deployed) is not Term.deployed
        return [name for name, term in self.terms.items() if overrides(term)]

    def deployed(self, student: nn.Module) -> nn.Module:
        """The KD student as it ships (:meth:`Term.deployed` of the one term that overrides it; else ``student``).
        Call it after the teacher's training: it may copy teacher parts."""
        deploying = self.deploying_terms()
        return self.terms[deploying[0]].deployed(student) if deploying else student

    def bind(self, student: nn.Module, teacher: nn.Module | None, data) -> None:
        """Check layer names and build adapters/heads for these models (architecture only)."""
        if len(deploying := self.deploying_terms()) > 1:
            fix = "at most one term may change the model that ships (SimKD's does): keep one of them"
            raise ConfigError("terms", ", ".join(deploying), fix)
        for name, term in self.terms.items():
            term.bind(student, teacher, data, f"terms.{name}")
        if self.class_balance is not None:
            counts = data.class_counts.get("train")
            if not counts:
                fix = "the data set reports no training class counts (DataBundle.class_counts['train'])"
                raise ConfigError("class_balance", self.class_balance, fix)
            self.class_weight = class_balance_weights(counts, self.class_balance, self.class_balance_beta)
            weights = [round(w, 3) for w in self.class_weight.tolist()]
            log.info("class-balanced KD (%s): class weights %s", self.class_balance, weights)

    def prepare(self, student: nn.Module, teacher, train, device: torch.device) -> None:
        """Each term's stage before training (:meth:`Term.prepare`), its losses logged per epoch."""
        for name, term in self.terms.items():
            if getattr(term, "prepare", None) is None:
                continue

            @torch.no_grad()
            def seen(batch, name=name):
                out = self.summarize(teacher(batch))
                return {**out, "features": out["summaries"][name]} if name in out["summaries"] else out

            def batches(epoch: int):
                train.set_epoch(epoch)
                if teacher is not None:
                    teacher.set_epoch(epoch)
                for batch in train:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    yield batch, (seen(batch) if teacher is not None else None)

            losses = term.prepare(student, batches, device)
            for epoch, loss in enumerate(losses, 1):
                log.info("terms.%s: prepare epoch %d/%d, loss %.4g", name, epoch, len(losses), loss)

    def set_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Current alpha, temperature, beta and term weights; returns those worth logging
        (the hyperparameters some term reads; the weights when there is more than one term)."""
        cur = {
            k: self.schedules[k].value(v, epoch, epochs) if k in self.schedules else v for k, v in self.targets.items()
        }
        for name, spec in self.weight_specs.items():
            base = TIED[spec](cur["alpha"]) if spec in TIED else float(spec)
            cur[f"weight/{name}"] = self.schedules[name].value(base, epoch, epochs) if name in self.schedules else base
        self.current, self.epoch, self.epochs = cur, epoch, epochs
        used = {h for t in self.terms.values() for h in t.hyperparameters} | set(self.schedules)
        used |= {"alpha"} if any(w in TIED for w in self.weight_specs.values()) else set()
        shown = {k: cur[k] for k in HYPERPARAMETERS if k in used}
        if len(self.terms) > 1 or any(k in self.schedules for k in self.terms):
            shown.update({k: v for k, v in cur.items() if k.startswith("weight/")})
        return shown

    def logged(self) -> dict[str, float]:
        """What the terms learn (``kd/temperature`` of CTKD), for the epoch log."""
        return {f"{name}/{k}": v for name, term in self.terms.items() for k, v in term.logged().items()}

    def describe(self) -> str:
        """The terms and their weights, for the log: ``(1-alpha)*ce + alpha*kd``."""
        return " + ".join(f"({w})*{name}" if w in TIED else f"{w}*{name}" for name, w in self.weight_specs.items())

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
        teacher = self.summarize(teacher)
        weights = self._sample_weights(batch, teacher)
        state = TermState(cur["temperature"], cur["alpha"], cur["beta"], weights, self.epoch, self.epochs)
        out = {}
        for name, term in self.terms.items():
            weight = cur[f"weight/{name}"]
            tied_and_scheduled = self.weight_specs[name] in TIED and "alpha" in self.schedules
            if weight == 0 and name not in self.schedules and not tied_and_scheduled:
                continue  # a term switched off costs nothing
            seen = teacher  # a term reading features sees its own summaries as teacher["features"]
            if teacher is not None and term.teacher_layers:
                seen = {**teacher, "features": teacher["summaries"][name]}
            out[name] = weight * term(batch, student, seen, state)
        return out
