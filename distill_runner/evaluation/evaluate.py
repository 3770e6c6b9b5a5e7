"""The evaluate step: every model of a run on the test split (quality, size, FLOPs, speed, CKA).

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import logging
import platform
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from torch import nn

from distill_runner.data.bundle import DataBundle
from distill_runner.evaluation import metrics as measure
from distill_runner.io.cache import Cache, digest, eval_key, speed_key
from distill_runner.models.factories import architecture, count_parameters
from distill_runner.reporting.results import STUDENTS, ModelResult
from distill_runner.spec import EvalSpec, RunSpec, typed
from distill_runner.train import engine

log = logging.getLogger(__name__)


def evaluate(
    spec: RunSpec,
    data: DataBundle,
    models: dict[str, nn.Module],
    device: torch.device,
    precision: engine.Precision,
    checkpoint_dir: Path | None = None,
    layer_pairs: list[tuple[str, str]] = (),
    cache: Cache | None = None,
    cache_keys: dict[str, str | None] | None = None,
) -> dict[str, ModelResult]:
    """Every model on the test split: prediction quality, size, FLOPs, speed; CKA of each student
    to the teacher (penultimate features and each (teacher, student) layer pair of the recipe).

    Extra teachers (``distill.teachers.<name>``) are measured like the teacher; speed-ups and
    compression are relative to the run's first teacher (null without one).
    Sizes are those of ``checkpoint_dir/<role>.pt`` when it exists, else of a serialized state_dict.
    A model with a cache key (a cached teacher or baseline) is evaluated once per key, device and
    evaluation settings; the jobs of a sweep reuse its results and test-split features. Speeds come
    from one timing session of all the run's models (:func:`speeds`). Returns the results and where
    the speeds come from.
    """
    spec = typed(spec)
    settings = _settings(spec.eval or EvalSpec())  # no eval node (a config written before it existed): the defaults
    results, features = {}, {}
    for role, model in models.items():
        layers = [pair[0 if role == "teacher" else 1] for pair in layer_pairs] if role in ("teacher", *STUDENTS) else []
        model_key = (cache_keys or {}).get(role)
        measure_one = partial(_evaluate_one, role, model.to(device), data, device, precision, checkpoint_dir, layers)
        if cache is not None and model_key is not None:
            key = eval_key(spec, model_key, role, layers, device)
            results[role], features[role] = _evaluate_cached(cache, key, model_key, role, model, measure_one, settings)
        else:
            results[role], features[role] = measure_one(settings)
    timed, speed_source = speeds(spec, models, data, device, precision, settings, cache)
    for role, r in results.items():
        r.update(timed[role])
    for role, r in results.items():
        _add_relative_to_teacher(role, r, results.get("teacher"), features, layer_pairs)
    return {role: ModelResult(**r) for role, r in results.items()}, speed_source


def _settings(node: EvalSpec) -> dict:
    """The ``eval.*`` values the measurements read (a dict: it is also stored with a cached evaluation's inputs)."""
    keys = ("latency_budget_s", "throughput_budget_s", "cka_samples", "speed", "latency_threads")
    return {k: getattr(node, k) for k in keys}


EVAL_DEFAULTS = _settings(EvalSpec())  # what a run without an eval node measures with


def _evaluate_cached(cache: Cache, key: str, model_key: str, role: str, model: nn.Module, measure_one, settings: dict):
    """``measure_one(settings)`` (a result and test-split features) once per evaluation ``key``; then reused."""

    def build() -> dict:
        result, layer_features = measure_one(settings)
        return {"result": result, "features": layer_features}

    entry, source = cache.fetch("evals", key, build, shared=False)
    result = dict(entry["result"])
    if source.startswith("reused"):
        result["name"] = architecture(model)
        log.info("reusing the evaluation of %s (%s), %s", role, model_key, source)
    return result, entry["features"]


def _add_relative_to_teacher(role: str, r: dict, teacher: dict | None, features: dict, layer_pairs) -> None:
    """Speed-ups and compression relative to the run's (first) teacher (None without one); for a student, its
    linear CKA to the teacher on the same test images."""
    if teacher is not None:
        r["speedup"] = r["images_per_s"] / teacher["images_per_s"]
        r["latency_speedup"] = teacher["latency_ms"] / r["latency_ms"]
        r["compression"] = teacher["params"] / r["params"]
    else:
        r["speedup"] = r["latency_speedup"] = r["compression"] = None
    if role in STUDENTS and teacher is not None:
        ours, theirs = features[role], features["teacher"]
        r["cka"] = (
            {"penultimate": measure.linear_cka(theirs["penultimate"], ours["penultimate"])}
            if "penultimate" in ours and "penultimate" in theirs
            else {}
        )
        r["cka"].update({f"{t} ~ {s}": measure.linear_cka(theirs[t], ours[s]) for t, s in layer_pairs})


def speeds(
    spec: RunSpec, models, data, device, precision, settings, cache: Cache | None
) -> tuple[dict[str, dict], str]:
    """Batch-1 latency and images/s of every model, timed back to back in one session, so that a speed-up never
    divides figures taken under different loads; and where they come from. Speed depends on the architecture
    alone, so models that print the same (the KD student and its baseline) are timed once. With
    ``eval.speed=cached`` the session is stored in the cache: a later run on this host with the same models,
    device, threads, precision and budgets (a sweep's later jobs) reuses it whole instead of timing again."""
    shapes = {role: digest(repr(model)) for role, model in models.items()}

    def session() -> dict:
        timed: dict[str, dict] = {}
        for role, model in models.items():
            if shapes[role] not in timed:
                timed[shapes[role]] = _speed(model, data, device, precision, settings)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return {"speeds": {role: timed[shapes[role]] for role in models}, "when": when}

    if cache is None or settings["speed"] == "measure":
        return session()["speeds"], "timed in this run"
    host = {"host": platform.node(), "cpu": platform.processor() or platform.machine()}
    key = speed_key(spec, shapes, device, precision.name, host)
    with cache.locked("speeds", key) as path:
        entry = cache.load(path)
        if entry is not None:
            log.info("latency and images/s timed together on %s, reused from %s (eval.speed=measure times them "
                     "again)", entry["when"], path)  # fmt: skip
            earlier = f"timed together on {entry['when']} by an earlier run on this host (eval.speed=cached)"
            return entry["speeds"], earlier
        entry = session()
        contended = {role: s["latency_contention"] for role, s in entry["speeds"].items() if s["latency_contention"]}
        if contended:  # a figure taken on a busy machine must not decide later runs
            log.warning("latency measured under contention (%s): not cached; later runs time again",
                        "; ".join(f"{role}: {why}" for role, why in contended.items()))  # fmt: skip
            return entry["speeds"], "timed in this run, under contention (not cached)"
        cache.store(path, entry)
    return entry["speeds"], "timed in this run"


def _speed(model, data, device, precision, settings) -> dict:
    """Batch-1 latency (with ``eval.latency_threads`` threads) and images/s at the evaluation batch size,
    measured now."""
    shape = (data.in_channels, data.image_size, data.image_size)
    latency = measure.latency(
        model, shape, device, precision, threads=settings["latency_threads"], budget_s=settings["latency_budget_s"]
    )
    images_per_s = measure.throughput(
        model, data.test.batch_size, shape, device, precision, budget_s=settings["throughput_budget_s"]
    )
    return {"latency_ms": latency.seconds * 1e3, "latency_repeats": latency.repeats, "latency_threads": latency.threads,
            "latency_rounds_ms": [r * 1e3 for r in latency.rounds], "latency_contention": latency.contention,
            "images_per_s": images_per_s}  # fmt: skip


def _evaluate_one(role, model, data, device, precision, checkpoint_dir, layers, settings) -> tuple[dict, dict]:
    """One model's results and its captured test-split features."""
    shape = (data.in_channels, data.image_size, data.image_size)
    try:
        head = measure.last_linear(model)[0]  # its input is the penultimate feature
    except ValueError:  # no nn.Linear head: no penultimate CKA for this model
        head = None
    capture = measure.capture(model, layers, penultimate=head is not None, max_samples=settings["cka_samples"])
    with capture as captured:
        logits, targets = engine.predict(model, data.test, device, precision)
    features = {k: torch.cat(v) for k, v in captured.items()}
    quality = measure.classification_report(logits, targets, data.num_classes)
    checkpoint = Path(checkpoint_dir) / f"{role}.pt" if checkpoint_dir is not None else None
    flops = measure.flops_per_image(model, shape, device)
    result = {
        "name": architecture(model),
        "params": count_parameters(model),
        "size_bytes": checkpoint.stat().st_size
        if checkpoint is not None and checkpoint.is_file()
        else measure.saved_size_bytes(model),
        "flops": flops,
        "macs": flops // 2,
        "test_acc": quality["accuracy"],
        "macro_f1": quality["macro_f1"],
        "ece": quality["ece"],
        "roc_auc": quality["roc_auc"],
        "per_class": quality["per_class"],
        "confusion": quality["confusion"],
        "penultimate_layer": head,
    }
    return result, features


def comparison(results: dict[str, ModelResult], no_teacher_reason: str | None = None) -> dict:
    """Run-level numbers: retention = student / (first) teacher accuracy, KD gain = student - baseline.
    Without a teacher (a recipe that needs none) retention is null and ``no_teacher_reason`` says why."""
    student, baseline, teacher = results["student"], results["baseline"], results.get("teacher")
    if teacher is None:
        retention, reason = None, no_teacher_reason or "no teacher in this run"
    else:
        retention = student.test_acc / teacher.test_acc if teacher.test_acc else None
        reason = None if retention is not None else "the teacher's test accuracy is 0"
    return {
        "retention": retention,
        "retention_reason": reason,
        "kd_gain": student.test_acc - baseline.test_acc,
        "kd_gain_macro_f1": student.macro_f1 - baseline.macro_f1,
        "test_size": sum(student.per_class["support"]),
    }
