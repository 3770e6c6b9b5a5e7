"""Early config validation: every user-facing key is checked before any work starts, and a bad
value fails with one line naming the key, the value and the fix."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torchvision
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from distill_runner.data.bundle import BALANCE
from distill_runner.errors import ConfigError, instantiate
from distill_runner.train.engine import PRECISIONS

_MISSING = object()
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compose(overrides: list[str]) -> DictConfig:
    """The distill-run config with ``overrides``, as the command line composes it: inside the running Hydra
    app, or in a short-lived one (scripts, tests, search workers)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (inf and nan are refused wherever a number is asked for)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_crop_scale(v) -> bool:
    return v is None or (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and len(v) == 2
        and all(map(_is_number, v))
        and 0 < v[0] <= v[1] <= 1
    )


def _check(cfg: DictConfig, key: str, ok: Callable[[object], bool], fix: str, required: bool = True) -> None:
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        if required:
            raise ConfigError(key, None, f"missing; {fix}")
        return
    if not ok(value):
        raise ConfigError(key, value, fix)


def _check_arch(cfg: DictConfig, node: str) -> None:
    arch = OmegaConf.select(cfg, f"{node}.model.arch")
    if arch is not None and arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"{node}.model.arch",
            arch,
            "not a torchvision classification model; e.g. resnet18, mobilenet_v2, mobilenet_v3_small, or pick a "
            "config: " + node + "=<name>",
        )


def _check_recipe(cfg: DictConfig) -> None:
    """The recipe's keys (temperature, alpha, terms, schedules, ...) are checked by the recipe itself,
    in one place: building it takes no model and no data."""
    from distill_runner.distill import signals

    signals.extra_teachers(cfg.distill)
    signals.teacher_weights(cfg.distill)
    instantiate(signals.recipe_node(cfg.distill), "distill", _recursive_=False)


def _leaf_keys(node, prefix: str = ""):
    for key, value in node.items_ex(resolve=False):
        if isinstance(value, DictConfig) and len(value):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _check_read_keys(cfg: DictConfig) -> None:
    """Every key is read by something: a key no part of distill-runner reads (``+foo=1``, a misspelt
    ``+trainer.epoch=3``) is refused instead of silently ignored. The known keys are those the cache
    declarations classify (distill_runner.cache); what a data set, model or recipe factory takes is
    checked by the factory itself (an unknown keyword is one line), so those nodes are passed through."""
    from distill_runner import cache

    known = [*cache.declared_keys(cfg), "dataset"]
    for key in _leaf_keys(cfg):
        if not cache.covered(key, known):
            close = difflib.get_close_matches(key, [k for k in known if "." in k], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            fix = f"no part of distill-runner reads this key; {hint}remove it (distill-run --cfg job lists every key)"
            raise ConfigError(key, OmegaConf.select(cfg, key), fix)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad user-facing value."""
    _check_read_keys(cfg)
    _check(cfg, "seed", lambda v: _is_int(v) and 0 <= v < 2**32, "use an integer in [0, 2^32), e.g. seed=0")
    _check(cfg, "dataset._target_", lambda v: isinstance(v, str), "pick a data set: dataset=digits")
    _check(
        cfg, "dataset.batch_size", lambda v: _is_int(v) and v >= 1, "use a positive integer, e.g. dataset.batch_size=64"
    )
    _check(
        cfg,
        "dataset.eval_batch_size",
        lambda v: _is_int(v) and v >= 1,
        "use a positive integer, e.g. dataset.eval_batch_size=256",
        required=False,
    )
    _check(
        cfg,
        "dataset.image_size",
        lambda v: _is_int(v) and v >= 8,
        "use an integer >= 8, e.g. dataset.image_size=32",
        required=False,
    )
    _check(
        cfg,
        "dataset.root",
        lambda v: v is None or isinstance(v, str),
        "use a folder path, e.g. dataset.root=data/chest_xray",
        required=False,
    )
    _check(cfg, "dataset.download", lambda v: isinstance(v, bool), "use true or false", required=False)
    _check(
        cfg,
        "dataset.val_from_train",
        lambda v: v is None or (_is_number(v) and 0 <= v < 1),  # 0: CIFAR validates on its test split
        "use null or a fraction in [0, 1), e.g. dataset.val_from_train=0.1",
        required=False,
    )
    _check(cfg, "dataset.balance", lambda v: v in BALANCE, f"use one of {', '.join(BALANCE)}", required=False)
    _check(
        cfg,
        "dataset.on_bad_image",
        lambda v: v in ("skip", "error"),
        "use skip (skip unreadable images with a warning) or error",
        required=False,
    )
    _check(
        cfg,
        "dataset.num_workers",
        lambda v: v == "auto" or (_is_int(v) and v >= 0),
        "use auto or an integer >= 0 (0 = load in the main process)",
        required=False,
    )
    _check(
        cfg,
        "dataset.pin_memory",
        lambda v: v == "auto" or isinstance(v, bool),
        "use auto, true or false",
        required=False,
    )
    _check(
        cfg,
        "dataset.limit",
        lambda v: v is None or (_is_int(v) and v >= 1),
        "use null or a positive integer",
        required=False,
    )
    _check(
        cfg,
        "dataset.resized_crop_scale",
        _is_crop_scale,
        "use null or [lo, hi] with 0 < lo <= hi <= 1, e.g. dataset.resized_crop_scale=[0.8,1.0]",
        required=False,
    )
    _check(
        cfg,
        "dataset.store_dir",
        lambda v: isinstance(v, str) and v != "",
        "give a folder, e.g. dataset.store_dir=outputs/cache/decoded",
        required=False,
    )
    _check(
        cfg,
        "data.decode_cache",
        lambda v: isinstance(v, bool),
        "use true (decode ImageFolder images once into a store under cache.dir) or false (PIL every epoch)",
        required=False,
    )
    _check(
        cfg,
        "data.on_device",
        lambda v: v == "auto" or isinstance(v, bool),
        "use auto, true (the whole training set as one tensor on the training device) or false (batches copied per "
        "step)",
        required=False,
    )
    _check(
        cfg,
        "dataset.decode_cache",
        lambda v: isinstance(v, bool),
        "use true or false (normally set through data.decode_cache)",
        required=False,
    )

    for node in ("teacher", "student"):
        _check(
            cfg, f"{node}.model._target_", lambda v: isinstance(v, str), f"pick one: {node}=<name> (see conf/{node}/)"
        )
        _check_arch(cfg, node)
    _check(
        cfg,
        "teacher.epochs",
        lambda v: _is_int(v) and v >= 0,
        "use an integer >= 0 (0 = use the teacher as loaded), e.g. teacher.epochs=3",
    )
    _check(
        cfg,
        "teacher.weights",
        lambda v: v is None or isinstance(v, str),
        "use null or a weights name: torchvision's (teacher.weights=IMAGENET1K_V1) or a timm tag (a1_in1k)",
    )
    for node in ("teacher", *(f"distill.teachers.{n}" for n in (OmegaConf.select(cfg, "distill.teachers") or {}))):
        _check(
            cfg,
            f"{node}.label_smoothing",
            lambda v: _is_number(v) and 0 <= v < 1,
            f"use a number in [0, 1), e.g. {node}.label_smoothing=0.1 (0: plain cross-entropy)",
            required=False,
        )
    for node in ("teacher", "student"):
        _check(
            cfg,
            f"{node}.checkpoint",
            lambda v: v is None or Path(str(v)).expanduser().is_file(),
            "no such file; give the path of a saved state_dict, training checkpoint or .safetensors file, or null",
            required=node == "teacher",
        )
    if cfg.teacher.epochs == 0 and cfg.teacher.weights is None and cfg.teacher.checkpoint is None:
        raise ConfigError(
            "teacher.epochs",
            0,
            "a teacher used as loaded needs teacher.checkpoint=PATH or teacher.weights; or train it: teacher.epochs=3",
        )
    if cfg.teacher.weights is not None and cfg.teacher.epochs == 0 and cfg.teacher.checkpoint is None:
        raise ConfigError(
            "teacher.epochs",
            0,
            "ImageNet weights come with a new head for this data set's classes and must be fine-tuned; use "
            "teacher.epochs>=1",
        )

    _check(cfg, "distill._target_", lambda v: isinstance(v, str), "pick a recipe: distill=kd")
    _check(
        cfg,
        "distill.teacher_outputs",
        lambda v: v in ("cached", "online"),
        "use cached (replay the teacher's logits) or online (run the teacher every batch)",
        required=False,
    )
    _check(cfg, "cache.enabled", lambda v: isinstance(v, bool), "use true or false")
    _check(cfg, "cache.dir", lambda v: isinstance(v, str) and v != "", "give a folder, e.g. cache.dir=outputs/cache")
    _check(cfg, "cache.shared", lambda v: isinstance(v, bool), "use true or false", required=False)
    _check(
        cfg,
        "cache.teacher_outputs_dtype",
        lambda v: v in ("float16", "bfloat16", "float32"),
        "use float16, bfloat16 or float32",
    )
    _check(
        cfg,
        "cache.max_teacher_outputs_mb",
        lambda v: _is_number(v) and v >= 0,
        "use a size in MB >= 0 (0 = never cache teacher outputs)",
    )
    _check_recipe(cfg)

    _check(cfg, "trainer.epochs", lambda v: _is_int(v) and v >= 1, "use an integer >= 1, e.g. trainer.epochs=10")
    for node in ("teacher", "trainer"):
        _check(
            cfg,
            f"{node}.optimizer.lr",
            lambda v: _is_number(v) and v > 0,
            f"use a learning rate > 0, e.g. {node}.optimizer.lr=1e-3",
            required=False,
        )
        _check(
            cfg,
            f"{node}.optimizer.weight_decay",
            lambda v: _is_number(v) and v >= 0,
            f"use a number >= 0, e.g. {node}.optimizer.weight_decay=1e-4",
            required=False,
        )
        _check(
            cfg,
            f"{node}.scheduler.warmup_epochs",
            lambda v, node=node: _is_number(v) and 0 <= v <= cfg[node].epochs,
            f"use a number of epochs in [0, {node}.epochs={cfg[node].epochs}], e.g. {node}.scheduler.warmup_epochs=1",
            required=False,
        )
    _check(
        cfg,
        "trainer.device",
        lambda v: bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(v))),
        "use auto, cpu, cuda or cuda:N",
    )
    _check(cfg, "trainer.precision", lambda v: str(v) in PRECISIONS, f"use one of {', '.join(PRECISIONS)}")
    _check(cfg, "trainer.progress", lambda v: isinstance(v, bool), "use true or false")
    _check(cfg, "trainer.channels_last", lambda v: isinstance(v, bool), "use true or false", required=False)
    _check(
        cfg,
        "trainer.compile",
        lambda v: isinstance(v, bool) or v in COMPILE_MODES,
        f"use false, true or a torch.compile mode: {', '.join(COMPILE_MODES)}",
        required=False,
    )
    _check(
        cfg,
        "trainer.resume",
        lambda v: isinstance(v, (bool, str)),
        "use false, true (the newest unfinished run with these overrides), auto (this run folder: continue it if it "
        "holds checkpoints, else start) or a run folder",
        required=False,
    )

    _check(
        cfg,
        "export",
        lambda v: v is None or v == "onnx",
        "use null (no export) or onnx (ONNX + TorchScript of the KD student, checked on the test split)",
        required=False,
    )
    _check(
        cfg,
        "eval.latency_budget_s",
        lambda v: _is_number(v) and v > 0,
        "use a number of seconds > 0, e.g. eval.latency_budget_s=0.5",
        required=False,
    )
    _check(
        cfg,
        "eval.latency_threads",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "use a whole number of threads >= 1, as the deployment runs the model, e.g. eval.latency_threads=1",
        required=False,
    )
    _check(
        cfg,
        "eval.throughput_budget_s",
        lambda v: _is_number(v) and v > 0,
        "use a number of seconds > 0, e.g. eval.throughput_budget_s=2",
        required=False,
    )
    _check(
        cfg,
        "eval.cka_samples",
        lambda v: _is_int(v) and v >= 2,
        "use an integer >= 2, e.g. eval.cka_samples=2048",
        required=False,
    )
    _check(cfg, "eval.test_every_epoch", lambda v: isinstance(v, bool), "use true or false", required=False)
