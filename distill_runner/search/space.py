"""The search space as the user writes it (``search.space``, whose entries the schema checks:
:class:`~distill_runner.search_spec.SpaceEntrySpec`), its keys found in the config before any trial, and
sampled by an Optuna trial into Hydra overrides of the distill-run config.

An entry is keyed by a config key. A config group (``student``, ``distill``, ...) takes ``choices``
of its options; any other key takes ``choices`` (any YAML values) or a numeric range ``low``/``high``
(``log``, ``step``). ``when: {group: option}`` keeps an entry to the trials that chose that option.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from distill_runner.errors import ConfigError
from distill_runner.search_spec import SpaceEntrySpec

_MISSING = object()


@dataclass
class Entry:
    """One searched key."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict[str, str] = field(default_factory=dict)

    def applies(self, chosen: dict[str, object]) -> bool:
        return all(chosen.get(group) == option for group, option in self.when.items())

    def labels(self) -> list:
        """Optuna's categorical values: scalars as they are, lists and mappings as their JSON text."""
        return [c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c) for c in self.choices]

    def sample(self, trial):
        """This entry's value for ``trial`` (an Optuna trial: sampled, or fixed when enqueued)."""
        if self.choices is not None:
            label = trial.suggest_categorical(self.key, self.labels())
            return self.choices[self.labels().index(label)]
        integer = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))
        if integer:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def _with_hydra(read):
    """``read(config_loader)`` under the running Hydra app, or a short-lived one (tests, workers)."""
    from hydra import initialize_config_module

    if GlobalHydra.instance().is_initialized():
        return read(GlobalHydra.instance().config_loader())
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return read(GlobalHydra.instance().config_loader())


def config_groups() -> list[str]:
    """The top-level config groups a space may choose from (student, teacher, distill, dataset, ...)."""
    return _with_hydra(lambda loader: [g for g in loader.list_groups("") if g not in ("hydra", "search")])


def group_options(group: str) -> list[str]:
    return _with_hydra(lambda loader: loader.get_group_options(group))


def entries(space: dict[str, SpaceEntrySpec]) -> list[Entry]:
    """``search.space`` (checked by the schema: :class:`~distill_runner.search_spec.SpaceEntrySpec`) as entries."""
    return [Entry(key, e.choices, e.low, e.high, e.log, e.step, e.when) for key, e in space.items()]


def check(entries: list[Entry], base_overrides: list[str], compose) -> None:
    """Every group option exists and every key is in the config composed with the groups its
    ``when`` names: an unknown key is one line naming it, before any trial runs."""
    known_groups, all_groups = {e.key for e in entries if "." not in e.key}, config_groups()
    for entry in entries:
        where = f"search.space.{entry.key}"
        for group, option in entry.when.items():
            if group not in known_groups:
                raise ConfigError(f"{where}.when.{group}", option, f"{group} is not a group in search.space")
        if entry.key in all_groups:
            options = group_options(entry.key)
            if bad := [c for c in entry.choices or [None] if c not in options]:
                raise ConfigError(
                    where, bad[0], f"not an option of the {entry.key} group; options: {', '.join(options)}"
                )
            continue
        overrides = [*base_overrides, *(f"{g}={o}" for g, o in entry.when.items())]
        if OmegaConf.select(compose(overrides), entry.key, default=_MISSING) is _MISSING:
            raise ConfigError(
                where, entry.key, "no such key in the distill-run config (distill-run --cfg job lists them)"
            )


def sample(entries: list[Entry], trial) -> dict[str, object]:
    """The trial's values: groups first (``when`` reads them), then the keys that apply."""
    chosen: dict[str, object] = {}
    for entry in sorted(entries, key=lambda e: "." in e.key):
        if entry.applies(chosen):
            chosen[entry.key] = entry.sample(trial)
    return chosen


def overrides(values: dict[str, object]) -> list[str]:
    """Hydra overrides that set ``values``: ``student=tiny_cnn``, ``student.model.channels=[8,16]``."""
    return [f"{key}={_override_value(value)}" for key, value in values.items()]


def _override_value(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value).replace(" ", "") if value is not None else "null"
