"""Weights from a file trained elsewhere: ``teacher.checkpoint`` and ``student.checkpoint``.

Read in this order, never guessing silently (each step is named in the log line):

1. the file: ``*.safetensors`` with safetensors; anything else with ``torch.load(weights_only=True)``,
   which unpickles tensors and plain containers only. ``argparse.Namespace`` is the one class allowed
   besides: RepDistiller's ``<model>_last.pth`` and timm's ``train.py`` checkpoints hold their arguments
   as one. Any other pickled object (a whole ``nn.Module``, a class of a training framework) is refused.
2. the container: a dict whose values are all tensors is the state_dict; else the first of
   :data:`CONTAINERS` that holds one (``{"model": ...}``: RepDistiller, mdistiller, torchvision's
   reference scripts; ``{"state_dict": ...}``: Lightning, timm; ...).
3. the key prefix: the one that maps the file's keys exactly onto the model's (none, ``module.`` from
   DataParallel/DDP, ``model.``/``net.`` from Lightning modules, ``module.student.`` from mdistiller,
   ``_orig_mod.`` from torch.compile, any combination or another wrapper's name). Keys outside that
   prefix (the teacher inside a distiller's checkpoint) are left out, and the log says how many.

When no prefix fits, the error names the first mismatching key (missing, unexpected or of another
shape) under the prefix that fits best, and says which prefix it compared under.

Docs: docs/guide/models.md
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.io import storage

log = logging.getLogger(__name__)

# Checkpoint dicts that hold a state_dict under one of these keys, tried in this order.
CONTAINERS = ("model", "state_dict", "model_state_dict", "net", "network", "weights")
# What torch.load(weights_only=True) may unpickle besides tensors and containers: training arguments.
ALLOWED_GLOBALS = [argparse.Namespace]
SAVE_HINT = "save the weights alone: torch.save(model.state_dict(), path) or safetensors.torch.save_file"


@dataclass
class Fit:
    """How a file's keys compare with the model's once ``prefix`` is stripped."""

    prefix: str
    state: dict[str, torch.Tensor]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)  # "key (file shape) in file vs (model shape) in model"
    outside: list[str] = field(default_factory=list)  # file keys without the prefix, left out

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, key: str = "teacher.checkpoint") -> None:
    """Load the weights in ``path`` into ``model``, or raise a one-line :class:`ConfigError` under ``key``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(key, str(path), "no such file; give the path of a saved state_dict or safetensors file")
    raw, reader = read_file(path, key)
    state, container = unwrap(raw, path, key)
    fit = best_fit(state, model.state_dict(), key, path)
    if not fit.exact:
        raise ConfigError(key, str(path), mismatch(fit, model))
    model.load_state_dict(fit.state)
    steps = [reader, f"state_dict in {container!r}" if container else "a plain state_dict"]
    if fit.prefix:
        steps.append(f"prefix {fit.prefix!r} stripped")
    if fit.outside:
        steps.append(f"{len(fit.outside)} keys without it left out (e.g. {fit.outside[0]})")
    log.info("%s: %d tensors loaded from %s (%s)", key, len(fit.state), path, "; ".join(steps))


def read_file(path: Path, key: str) -> tuple[object, str]:
    """The file's content and how it was read. A file distill-run stored (a run's ``checkpoints/<model>.pt``,
    with its ``.sha256``) is checked against its checksum first: a damaged one is never loaded."""
    if storage.sidecar(path).is_file():
        try:
            storage.verify(path)
        except storage.DamagedFile as exc:
            fix = f"is damaged ({exc.reason}); give an intact copy, or train that model again"
            raise ConfigError(key, str(path), fix) from None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu"), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(key, str(path), f"could not be read as a safetensors file ({_one_line(exc)})") from None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True), "torch.load(weights_only=True)"
    except Exception as exc:  # a refused pickle, a corrupt or truncated file, not a torch file at all
        refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(exc))  # the two wordings of torch
        if refused:
            fix = (
                f"holds a pickled {refused.group(1)}, which loading with weights_only refuses (unpickling it could "
                f"run any code); {SAVE_HINT}"
            )
            raise ConfigError(key, str(path), fix) from None
        fix = f"could not be read as a checkpoint ({_one_line(exc)}); {SAVE_HINT}"
        raise ConfigError(key, str(path), fix) from None


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(raw: object, path: Path, key: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state_dict in a checkpoint, and the container key it was found under (None: the file is one)."""
    if _is_state_dict(raw):
        return dict(raw), None
    if isinstance(raw, Mapping):
        for container in CONTAINERS:
            if _is_state_dict(raw.get(container)):
                return dict(raw[container]), container
        keys = ", ".join(map(str, list(raw)[:8]))
        fix = (
            f"holds a dict with keys [{keys}] and none is a state_dict (known containers: {', '.join(CONTAINERS)}); "
            f"{SAVE_HINT}"
        )
        raise ConfigError(key, str(path), fix)
    raise ConfigError(key, str(path), f"holds a {type(raw).__name__}, not a state_dict; {SAVE_HINT}")


def candidate_prefixes(file_keys, model_keys: set[str]) -> Counter:
    """Each dotted prefix of the file's keys, with how many keys it maps onto a model key."""
    counts = Counter()
    for name in file_keys:
        parts = name.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                counts[".".join(parts[:i]) + "." if i else ""] += 1
    return counts


def compare(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str) -> Fit:
    inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    fit = Fit(prefix, inside, outside=[k for k in state if not k.startswith(prefix)])
    fit.missing = [k for k in own if k not in inside]
    fit.unexpected = [k for k in inside if k not in own]
    fit.shapes = [
        f"{k} {tuple(inside[k].shape)} in file vs {tuple(own[k].shape)} in model"
        for k in own
        if k in inside and inside[k].shape != own[k].shape
    ]
    return fit


def best_fit(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], key: str, path: Path) -> Fit:
    """The prefix that maps the file's keys exactly onto the model's; else the one that maps the most."""
    counts = candidate_prefixes(state, set(own))
    ranked = sorted(counts, key=lambda p: (-counts[p], len(p))) or [""]
    fits = [compare(state, own, p) for p in ranked]
    exact = [f for f in fits if f.exact]
    if len(exact) > 1:  # a distiller's checkpoint with a teacher and a student of one architecture
        names = " and ".join(repr(f.prefix) for f in exact)
        p = exact[0].prefix
        fix = (
            f"its keys fit the model under {names}: keep one part, e.g. torch.save({{k.removeprefix({p!r}): v for "
            f"k, v in state.items() if k.startswith({p!r})}}, path)"
        )
        raise ConfigError(key, str(path), fix)
    return exact[0] if exact else fits[0]


def mismatch(fit: Fit, model: nn.Module) -> str:
    """The one-line fix for keys that do not fit: the first bad key first, the class count where it differs."""
    under = f" (compared after stripping prefix {fit.prefix!r})" if fit.prefix else ""
    parts = []
    if fit.shapes:
        parts.append("shape mismatch: " + "; ".join(fit.shapes[:3]))
    if fit.missing:
        parts.append(f"{len(fit.missing)} missing keys, first {fit.missing[0]!r}")
    if fit.unexpected:
        parts.append(f"{len(fit.unexpected)} unexpected keys, first {fit.unexpected[0]!r}")
    hint = "the checkpoint was saved from a different architecture, stem or class count"
    if not fit.prefix and not set(fit.state) & set(model.state_dict()):
        hint = "no key of the file is a key of the model, under any prefix: another architecture"
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    weight = f"{head[0]}.weight" if head else None
    own = model.state_dict()
    if weight in fit.state and weight in own and fit.state[weight].shape[0] != own[weight].shape[0]:
        file_classes, data_classes = fit.state[weight].shape[0], own[weight].shape[0]
        parts.insert(0, f"the checkpoint has {file_classes} classes, the data set has {data_classes}")
        hint = "train the model on this data set or load a checkpoint saved from it"
    return f"does not fit the model{under}: {'; '.join(parts)} ({hint})"
