"""Per-epoch schedules for a recipe's alpha, temperature, beta and term weights.

A schedule moves a value from ``start`` to its configured (target) value over the first
``ramp`` fraction of training, then holds the target:

    p(e) = min(1, (e + 1) / (ramp * E))          e = 0, 1, ..., E - 1 (epoch index), E epochs
    constant: v(e) = target
    linear:   v(e) = start + (target - start) * p(e)
    cosine:   v(e) = start + (target - start) * (1 - cos(pi * p(e))) / 2

So the last epoch of the ramp reaches the target and the first epoch is one step in (this is
mdistiller's DKD warm-up ``min(epoch / warmup, 1)`` with 1-based epochs, for ``ramp = warmup / E``).
Example: alpha=0.5 with ``{kind: linear, start: 0, ramp: 0.5}`` over E=10 epochs gives
0.1, 0.2, 0.3, 0.4, 0.5, 0.5, ... In config a schedule is a kind name (``linear``: start 0, ramp 1)
or a mapping ``{kind, start, ramp}``.

Docs: docs/guide/recipes.md
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from distill_runner.errors import ConfigError

KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    start: float = 0.0
    ramp: float = 1.0

    def progress(self, epoch: int, epochs: int) -> float:
        return min(1.0, (epoch + 1) / (self.ramp * max(1, epochs)))

    def value(self, target: float, epoch: int, epochs: int) -> float:
        """The scheduled value for 0-based ``epoch`` of ``epochs``, ending at ``target``."""
        if self.kind == "constant":
            return float(target)
        p = self.progress(epoch, epochs)
        if self.kind == "cosine":
            p = (1 - math.cos(math.pi * p)) / 2
        return float(self.start + (target - self.start) * p)


def parse_schedule(spec, key: str) -> Schedule:
    """A :class:`Schedule` from config: a kind name or ``{kind, start, ramp}``; errors name ``key``."""
    if spec is None:
        return Schedule()
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(key, spec, f"use a kind ({', '.join(KINDS)}) or {{kind: linear, start: 0, ramp: 0.5}}")
    unknown = set(spec) - {"kind", "start", "ramp"}
    if unknown:
        raise ConfigError(
            f"{key}.{sorted(unknown)[0]}", spec[sorted(unknown)[0]], "a schedule has only the keys kind, start, ramp"
        )
    kind = spec.get("kind", "linear")
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind", kind, f"use one of {', '.join(KINDS)}")
    start, ramp = spec.get("start", 0.0), spec.get("ramp", 1.0)
    if not isinstance(start, (int, float)) or isinstance(start, bool):
        raise ConfigError(f"{key}.start", start, "use a number: the value at the start of the ramp")
    if not isinstance(ramp, (int, float)) or isinstance(ramp, bool) or not 0 < ramp <= 1:
        raise ConfigError(
            f"{key}.ramp", ramp, "use a fraction of training in (0, 1], e.g. 0.5 = reach the target halfway"
        )
    return Schedule(kind, float(start), float(ramp))
