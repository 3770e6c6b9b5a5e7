"""The run's results as types: what ``metrics.json`` holds, written and read only through these.

One name per role everywhere (stage, checkpoint, TensorBoard folder, plot label, report row, key):
``teacher``, ``student`` (the KD student), ``baseline`` (the same student trained from scratch).
Extra teachers of a multi-teacher recipe are stages and models named by their config key
(``distill.teachers.<name>``, labelled "teacher (<name>)"); ``teacher`` is always the run's first
teacher, the one retention and speed-ups refer to. A run whose recipe needs no teacher may have none.

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from distill_runner.errors import ConfigError
from distill_runner.io.storage import atomic_write_text

ROLES = ("teacher", "student", "baseline")
STUDENTS = ("student", "baseline")
ROLE_LABELS = {"teacher": "teacher", "student": "student (KD)", "baseline": "student (scratch)"}
EXTRA_TEACHER = "distill.teachers."
VERSION = 2  # 1: the unversioned metrics.json before typed results (stage "distill", one "export")


def label(role: str) -> str:
    """The role's name in tables and plots: "student (KD)", "teacher (cnn)" for distill.teachers.cnn."""
    return ROLE_LABELS.get(role) or f"teacher ({role.removeprefix(EXTRA_TEACHER)})"


def model_order(roles) -> list[str]:
    """Teachers first (the run's teacher, then the extra ones), then the KD student and the baseline."""
    rank = lambda r: 0 if r == "teacher" else 1 if r.startswith(EXTRA_TEACHER) else 2 + STUDENTS.index(r)
    return sorted(roles, key=rank)


@dataclass
class StageResult:
    epochs: int
    final_val_acc: float | None
    wall_time_s: float
    history: list[dict] = field(default_factory=list)  # one record per epoch: loss/<term>, lr, val/acc, ...
    reused: bool = False  # loaded from the cache instead of trained
    cache_key: str | None = None
    recipe_params: int = 0  # adapters/heads trained with the student, not shipped
    includes: str | None = None  # what ships with the KD student beyond its own layers (SimKD: projector, teacher head)
    # With eval.test_every_epoch: test accuracy of the best epoch (the highest; what the CIFAR benchmarks report,
    # selected on the test split itself), that epoch (1-based), and of the last epoch (no selection).
    best_test_acc: float | None = None
    best_test_epoch: int | None = None
    last_test_acc: float | None = None


@dataclass
class ModelResult:
    name: str  # the architecture
    params: int
    size_bytes: int
    flops: int
    macs: int
    test_acc: float
    macro_f1: float
    ece: float
    roc_auc: float | None
    per_class: dict  # precision, recall, f1, support: lists indexed by class id
    confusion: list  # rows: true class, columns: predicted class
    latency_ms: float
    latency_repeats: int
    images_per_s: float
    penultimate_layer: str | None = None
    latency_threads: int | None = None  # torch threads of the batch-1 latency (eval.latency_threads)
    latency_rounds_ms: list = field(default_factory=list)  # each round's median; latency_ms is their median
    latency_contention: str | None = None  # why the latency was measured under contention; None: stable
    speedup: float | None = 1.0  # images/s relative to the teacher (null: no teacher in the run)
    latency_speedup: float | None = 1.0
    compression: float | None = 1.0  # teacher parameters / these
    cka: dict = field(default_factory=dict)  # to the teacher: "penultimate", "<teacher layer> ~ <student layer>"


@dataclass
class RunResults:
    dataset: str
    num_classes: int
    class_names: list
    class_counts: dict
    device: str
    processes: int
    precision: str
    seed: int
    eval_batch_size: int
    torch_threads: int
    models: dict[str, ModelResult]
    stages: dict[str, StageResult]
    retention: float | None  # student / teacher test accuracy (the run's first teacher)
    kd_gain: float  # student - baseline test accuracy
    kd_gain_macro_f1: float
    test_size: int
    exports: dict[str, dict] = field(default_factory=dict)  # model role -> export record
    retention_reason: str | None = None  # why retention is null (e.g. no teacher: the recipe needs none)
    eval_time_s: float | None = None
    wall_time_s: float | None = None
    speed_source: str = "timed in this run"  # or reused whole from an earlier run's timing session (eval.speed)
    version: int = VERSION

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "metrics.json") -> RunResults:
        raw = _upgrade(dict(raw))
        try:
            models = {role: _build(ModelResult, m) for role, m in raw.pop("models").items()}
            stages = {name: _build(StageResult, s) for name, s in raw.pop("stages").items()}
            return _build(cls, {**raw, "models": models, "stages": stages})
        except (KeyError, TypeError) as exc:
            fix = f"written by another distill-run version, it lacks {exc}; re-run the experiment to rewrite it"
            raise ConfigError("RUN_DIR", where, fix) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunResults:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError("RUN_DIR", str(path), f"cannot read it ({exc}); re-run the experiment") from None
        return cls.from_dict(raw, str(path))


def _build(cls, raw: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})


def _upgrade(raw: dict) -> dict:
    """A version-1 metrics.json (before typed results): stage ``distill`` is the ``student``; its one
    ``export`` record belongs to the model it names."""
    if raw.get("version", 1) >= VERSION:
        return raw
    stages = raw.get("stages", {})
    if "distill" in stages:
        raw["stages"] = {("student" if k == "distill" else k): v for k, v in stages.items()}
    if "export" in raw:
        export = raw.pop("export")
        raw["exports"] = {export.get("model", "student"): export}
    raw["version"] = VERSION
    return raw


def _finite(value):
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
