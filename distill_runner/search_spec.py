"""The typed declarations of distill-search's ``search`` node (conf/search/): the space, the objective, the
budgets, the study; :class:`~distill_runner.spec.RunSpec` holds it as ``search``, so the one validation
(:func:`distill_runner.config.validate`) checks every key and every space entry before any work.

Docs: docs/guide/search.md
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from distill_runner.errors import ConfigError
from distill_runner.schema import REQUIRED, Spec, is_bool, is_int, is_number, key, node, nullable, number_in, one_of

spec = dataclass(kw_only=True)  # as in distill_runner.spec
BOOL = "use true or false"


BUDGETS = ("latency_ms", "params", "macs")


@spec
class BudgetSpec(Spec):
    """What a search's chosen student must not exceed (null: no limit)."""

    UNKNOWN_FIX = "budgets are latency_ms, macs, params"

    latency_ms: float | None = key(None, nullable(number_in(0, low_open=True)), "use null or a number > 0",
                                   "batch-1 latency, ms")  # fmt: skip
    params: float | None = key(None, nullable(number_in(0, low_open=True)), "use null or a number > 0", "parameters")
    macs: float | None = key(None, nullable(number_in(0, low_open=True)), "use null or a number > 0", "MACs per image")


def _positive(k: str) -> str:
    return "use an integer >= 1"


def _is_mapping(v) -> bool:
    return OmegaConf.is_dict(v) or isinstance(v, dict)


_is_mapping.text = "a mapping"


@spec
class SpaceEntrySpec(Spec):
    """One entry of ``search.space``, keyed by the config key it varies: ``choices`` (a group's options, or any
    values) or a numeric range ``low``/``high`` (``log``, ``step``); ``when`` keeps it to the trials whose group
    choices match."""

    UNKNOWN_FIX = "an entry takes only choices, low, high, log, step, when"
    SHAPE_FIX = "give {choices: [...]} or {low: L, high: H}"

    choices: list | None = key(None, None, "", "the values (a group: its options)")
    low: float | None = key(None, None, "", "the range's lower end")
    high: float | None = key(None, None, "", "the range's upper end")
    log: bool = key(False, None, "", "sample the range on a log scale")
    step: float | None = key(None, None, "", "the range's step")
    when: dict = key({}, _is_mapping, "give {group: option}, e.g. when: {student: tiny_cnn}",
                     "only in trials whose groups chose these options")  # fmt: skip

    def check_together(self, path: str) -> None:
        if self.choices is not None:
            if not isinstance(self.choices, list) or not self.choices or self.low is not None:
                raise ConfigError(f"{path}.choices", self.choices, "give a non-empty list (and no low/high)")
        elif not (is_number(self.low) and is_number(self.high)) or self.low > self.high:
            fix = "give choices: [...] or numbers low <= high, e.g. {low: 1.0, high: 8.0}"
            raise ConfigError(path, OmegaConf.to_container(self.source, resolve=True), fix)
        elif self.log and self.low <= 0:
            raise ConfigError(f"{path}.low", self.low, "a log range needs low > 0")


@spec
class SearchSpec(Spec):
    """distill-search's node (conf/search/): the space, the objective, the budgets, the study."""

    trials: int = key(REQUIRED, number_in(1, integer=True), _positive, "finished trials the study holds")
    trial_epochs: int | None = key(
        None,
        nullable(number_in(1, integer=True)),
        "use null (trainer.epochs) or an integer >= 1",
        "epochs of each trial",
    )
    objective: str | None = key(
        None,
        one_of(None, "latency_ms", "macs", "params"),
        "use one of latency_ms, macs, params or null",
        "what accuracy is weighed against",
    )
    budget: BudgetSpec = node(BudgetSpec, "limits a chosen student must keep", required=False)
    space: dict[str, SpaceEntrySpec] = node(SpaceEntrySpec, "what the search varies, by config key", many=True)
    enqueue: list = key([], None, "", "trials to run first")
    sampler: dict | None = key(None, nullable(_is_mapping), "give {_target_: optuna.samplers.<name>, ...}",
                               "an Optuna sampler")  # fmt: skip
    pruner: dict | None = key(None, nullable(_is_mapping), "give {_target_: optuna.pruners.<name>, ...}",
                              "an Optuna pruner")  # fmt: skip
    storage: str | None = key(None, None, "", "null: <search folder>/study.journal; a .journal file; an RDB URL")
    repair_journal: bool = key(False, is_bool, BOOL, "cut a journal damaged mid-write before its first bad line")
    study_name: str = key("distill-search", None, "", "the study's name in the storage")
    workers: int = key(1, number_in(1, integer=True), _positive, "processes on this machine sharing the study")
    role: str = key("main", one_of("main", "worker"), "use main (the whole search) or worker (trials only)",
                    "main: teacher, trials, final step, report; worker: trials only")  # fmt: skip
    worker: int = key(0, is_int, "use an integer (sweep it to start workers: search.worker=1,2,3)", "a worker's number")
    final: bool = key(True, None, "", "retrain, test and export the chosen student")
    int8: bool = key(False, None, "", "also quantize the chosen student's ONNX file to int8")
    int8_calibration_images: int = key(256, number_in(1, integer=True), _positive,
                                       "training images the int8 calibration runs through")  # fmt: skip

    def check_together(self, path: str) -> None:
        if not self.space:
            fix = "give at least one key to search, e.g. distill.temperature: {low: 1, high: 8}"
            raise ConfigError(f"{path}.space", {}, fix)

    def budgets(self) -> dict[str, float]:
        """The budgets set (null: no limit), by name."""
        limits = {k: getattr(self.budget, k) for k in BUDGETS} if self.budget is not None else {}
        return {k: v for k, v in limits.items() if v is not None}
