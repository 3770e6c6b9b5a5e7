"""The mechanism of the typed configuration (the declarations are in :mod:`distill_runner.spec`).

Each config node is a plain dataclass; each key is a field declared with :func:`key`: its type (the
annotation), its check (``ok``, one of the small predicates below, with its range in words), the fix a
user reads when the value is bad, a one-line help and which cached artefacts it affects (:class:`Affects`,
what :mod:`distill_runner.io.cache` builds every key from). :func:`parse` walks the composed Hydra config
against the dataclasses once, before any work, into one typed object; every error is one line naming
the key, the value and the fix (:class:`~distill_runner.errors.ConfigError`).

Why plain dataclasses and our own walker, not Hydra structured configs (ConfigStore) or pydantic:
OmegaConf's structured configs coerce values (``dataset.download=yes`` would become True, ``"3"`` an
int) and report errors over several lines without a fix; they know types, not ranges, and the group
options (``dataset/*``, ``teacher/*``) carry keys that differ by ``_target_``, which a closed structured
node refuses. pydantic is not installed (one more dependency), also coerces unless told otherwise, and its
errors span lines too. The walker here is ~150 lines and keeps every existing message word for word.

Docs: docs/reference/configuration.md
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields

from omegaconf import DictConfig, OmegaConf

from distill_runner.errors import ConfigError

_ABSENT = object()
REQUIRED = MISSING  # the default of a key that must be set


class Affects(enum.Flag):
    """Which cached artefacts a key determines. Each cache key is a digest of the keys flagged for it."""

    DATA = enum.auto()  # the training data: every teacher, the baseline and the replayed teacher outputs
    TEACHER = enum.auto()  # a fine-tuned teacher (keys of a teacher node: that teacher's; elsewhere: every one)
    BASELINE = enum.auto()  # the scratch baseline
    OUTPUTS = enum.auto()  # the replayed teacher outputs
    EVAL = enum.auto()  # an evaluation of a cached model
    SPEED = enum.auto()  # a timing session of the run's models
    RUN = enum.auto()  # this run's own results, never cached (the recipe, the export)
    NOTHING = enum.auto()  # where, how fast or what is shown: never a result


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float, not a bool (inf and nan are refused wherever a number is asked for)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_bool(v) -> bool:
    return isinstance(v, bool)


def is_text(v) -> bool:
    return isinstance(v, str) and v != ""


is_int.text, is_number.text, is_bool.text, is_text.text = "int", "number", "bool", "non-empty text"


def number_in(low: float | None = None, high: float | None = None, low_open=False, high_open=False, integer=False):
    """A predicate: an int (``integer``) or a finite number within the bounds (``None``: unbounded)."""

    def ok(v) -> bool:
        if not (is_int(v) if integer else is_number(v)):
            return False
        above = low is None or (v > low if low_open else v >= low)
        return above and (high is None or (v < high if high_open else v <= high))

    ok.text = _range_text("int" if integer else "number", low, high, low_open, high_open)
    return ok


def _range_text(kind, low, high, low_open, high_open) -> str:
    if high is None:
        return kind if low is None else f"{kind} {'>' if low_open else '>='} {low:g}"
    return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def one_of(*choices):
    ok = lambda v: v in choices
    ok.text = "one of " + ", ".join(map(str, choices))
    return ok


def nullable(check):
    ok = lambda v: v is None or check(v)
    ok.text = f"null or {getattr(check, 'text', check.__name__)}"
    return ok


def key(default=MISSING, ok=None, fix: str | Callable[[str], str] = "", help: str = "", affects: Affects | None = None,
        file: bool = False):  # fmt: skip
    """A config key: its default (none: required), check, fix, help and the artefacts it ``affects``.
    ``file``: the value is a path whose content (not the path) is the input of a cache key."""
    meta = {"ok": ok, "fix": fix, "help": help, "affects": affects, "file": file}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def node(cls=None, help: str = "", affects: Affects | None = None, required: bool = True, many: bool = False):
    """A sub-node: a spec class (``None``: any mapping), or with ``many`` a mapping of names to them.
    ``affects`` set here makes the whole subtree one input (its keys inherit it)."""
    meta = {"node": cls, "help": help, "affects": affects, "required": required, "many": many}
    return dataclasses.field(default=None, metadata=meta)


@dataclass(kw_only=True)
class Spec:
    """A config node. ``EXTRA``: keys it does not declare are refused (None), or passed through to the
    node's factory (``_target_``) with these affects. ``source`` is the DictConfig it was read from."""

    EXTRA: typing.ClassVar[Affects | None] = None
    UNKNOWN_FIX: typing.ClassVar[str] = ""  # the fix for a key it does not declare (default: "did you mean ...")
    SHAPE_FIX: typing.ClassVar[str] = ""  # the fix for a value that is not a mapping (default: the node's help)

    def __post_init__(self):
        self.source: DictConfig | None = None

    def check_together(self, path: str) -> None:
        """The checks that span this node's keys, once each key is read (``path``: the node's); raise a
        :class:`ConfigError` naming the key, the value and the fix. None by default."""

    def as_dict(self) -> dict:
        """The node as it was read, as plain dicts and lists (interpolations resolved; keys passed through to its
        factory included): what a digest, a YAML file or a table of hyperparameters holds."""
        return plain(self.source) if self.source is not None else {}


def plain(node):
    """A config node (a spec, a DictConfig or ListConfig) as plain dicts and lists, interpolations resolved;
    any other value as it is. The one way below the runner to see a node's keys that no spec declares."""
    if isinstance(node, Spec):
        return node.as_dict()
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_plain(path) -> dict | list:
    """A YAML file Hydra or a run wrote (``.hydra/config.yaml``, ``overrides.yaml``), as :func:`plain` values."""
    return plain(OmegaConf.load(path))


def dump_yaml(values: dict) -> str:
    """Plain values as YAML, as Hydra writes a config (:func:`load_plain` reads it back)."""
    return OmegaConf.to_yaml(OmegaConf.create(values))


def _fix(meta, path: str) -> str:
    fix = meta["fix"]
    if callable(fix):
        return fix(path)
    return fix or f"use a value of type {getattr(meta['ok'], 'text', 'as documented')}"


def parse(cls: type[Spec], cfg: DictConfig | None, path: str = "") -> Spec:
    """``cfg`` checked against ``cls`` into an instance: unknown keys first (every node), then each
    declared key in declaration order. Raises :class:`ConfigError` for the first problem."""
    for bad, owner, value in _unknown_keys(cls, cfg, path):
        raise _unknown(bad, value, cls, owner, path)
    return _read(cls, cfg, path)


def _unknown(bad: str, value, root: type[Spec], owner: type[Spec], path: str) -> ConfigError:
    if owner.UNKNOWN_FIX:
        return ConfigError(bad, value, owner.UNKNOWN_FIX)
    known = [k.path for k in reference(root, path) if "." in k.path]
    close = difflib.get_close_matches(bad, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    fix = f"no part of distill-runner reads this key; {hint}remove it (distill-run --cfg job lists every key)"
    return ConfigError(bad, value, fix)


def _items(cfg: DictConfig | None) -> Iterator[tuple[str, object]]:
    return iter(cfg.items_ex(resolve=False)) if isinstance(cfg, DictConfig) else iter(())


def unknown_keys(cls: type[Spec], cfg: DictConfig | None, path: str = "") -> Iterator[tuple[str, type[Spec]]]:
    """The dotted paths of keys in ``cfg`` that ``cls`` neither declares nor passes through, with their node."""
    return ((bad, owner) for bad, owner, _ in _unknown_keys(cls, cfg, path))


def _unknown_keys(cls: type[Spec], cfg: DictConfig | None, path: str) -> Iterator[tuple[str, type[Spec], object]]:
    """:func:`unknown_keys` with each key's value (a key of a mapping of nodes may hold dots: the search space's)."""
    declared = {f.name: f for f in fields(cls)}
    for name, value in _items(cfg):
        where = f"{path}.{name}" if path else str(name)
        f = declared.get(name)
        if f is None:
            if cls.EXTRA is None:
                leaf, parent, name = (
                    next(_leaves(value, where)) if isinstance(value, DictConfig) and len(value) else (where, cfg, name)
                )
                yield leaf, cls, parent[name]  # resolved, as the value it gets
            continue
        sub = f.metadata.get("node")
        if sub is not None and isinstance(value, DictConfig):
            for child, child_cfg in _items(value) if f.metadata["many"] else [(None, value)]:
                yield from _unknown_keys(sub, child_cfg, where if child is None else f"{where}.{child}")


def _leaves(node: DictConfig, prefix: str) -> Iterator[tuple[str, DictConfig, object]]:
    """The dotted path of each leaf under ``node``, with its parent and key."""
    for k, v in _items(node):
        yield from _leaves(v, f"{prefix}.{k}") if isinstance(v, DictConfig) and len(v) else [(f"{prefix}.{k}", node, k)]


def _read(cls: type[Spec], cfg: DictConfig | None, path: str) -> Spec:
    if cfg is not None and not isinstance(cfg, DictConfig):
        raise ConfigError(path, cfg, cls.SHAPE_FIX or f"give a mapping: {cls.__doc__.splitlines()[0]}")
    values = {}
    for f in fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        raw = OmegaConf.select(cfg, f.name, default=_ABSENT) if cfg is not None else _ABSENT
        values[f.name] = _value(f, raw, where)
    spec = cls(**values)
    spec.source = cfg
    spec.check_together(path)
    return spec


def _value(f: dataclasses.Field, raw, where: str):
    meta = f.metadata
    if "node" in meta:
        if raw is _ABSENT or raw is None:
            if meta["required"] and raw is _ABSENT:
                raise ConfigError(where, None, f"missing; {meta['help']}")
            return {} if meta["many"] else None
        if meta["node"] is None:
            return raw
        if meta["many"]:
            return {str(k): _read(meta["node"], v, f"{where}.{k}") for k, v in _items(raw)}
        return _read(meta["node"], raw, where)
    if raw is _ABSENT:
        if f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(where, None, f"missing; {_fix(meta, where)}")
        return f.default if f.default is not MISSING else f.default_factory()
    if meta["ok"] is not None and not meta["ok"](raw):
        raise ConfigError(where, raw, _fix(meta, where))
    return OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw


@dataclass(frozen=True)
class Key:
    """One declared key, as the configuration reference lists it (``default``: "(required)" when it must be set)."""

    path: str
    type: str
    default: object
    check: str
    help: str
    affects: Affects | None
    file: bool = False
    node: bool = False  # a whole subtree (a factory's node: model, optimizer, scheduler, hydra)


def reference(cls: type[Spec], path: str = "", affects: Affects | None = None, skip=()) -> Iterator[Key]:
    """Every declared key under ``cls`` with its type, default, check, help and affects (a key with no
    affects of its own inherits its node's). A mapping of nodes (``distill.teachers``) is listed as
    ``<name>``; node types in ``skip`` are left out."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        meta, own = f.metadata, f.metadata.get("affects") or affects
        sub = meta.get("node", _ABSENT)
        if sub is _ABSENT:
            check = getattr(meta["ok"], "text", "") if meta["ok"] is not None else ""
            yield Key(where, _type_text(hints[f.name]), _default(f), check, meta["help"], own, meta["file"])
        elif sub in skip:
            continue
        elif sub is None or (meta["affects"] is not None and not meta["many"]):
            yield Key(where, "node", None, "", meta["help"], own, node=True)
            if sub is not None:
                yield from reference(sub, where, own, skip)
        else:
            yield from reference(sub, f"{where}.<name>" if meta["many"] else where, own, skip)


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    return "(required)" if f.default_factory is MISSING else f.default_factory()


def _type_text(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def inputs(cls: type[Spec], flag: Affects, skip=()) -> list[Key]:
    """The keys (or whole subtrees) under ``cls`` that determine the artefacts of ``flag``: what a cache key
    is a digest of. A key inside a subtree that is one input is not listed again; mappings of nodes are not
    entered (their nodes are keyed apart, e.g. each extra teacher)."""
    found, covered = [], []
    for k in reference(cls, skip=skip):
        if "<name>" in k.path or any(k.path.startswith(c + ".") for c in covered):
            continue
        if k.node:
            covered.append(k.path)
        if k.affects is not None and flag in k.affects:
            found.append(k)
    return found
