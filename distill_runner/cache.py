"""Work a sweep shares: fine-tuned teachers, scratch baselines, replayable teacher outputs and
evaluations, computed once and reused.

Entries live under ``cache.dir/<kind>/<key>.pt``, each with its checksum ``<key>.pt.sha256``; a cached
model's weights are their own file, ``<key>.model.pt``, which run folders hard-link. A key is a digest of
an explicit list of what determines the artefact (the ``*_INPUTS`` below, by config key; a key names its whole subtree).
Every other config key is declared in :data:`RUN_ONLY` (changes this run's own, never-cached results)
or :data:`NOT_RESULTS` (changes where or how fast, never what); ``tests/test_cache_keys.py`` fails
on a key that is in none of them. Writers hold a file lock (parallel jobs wait for the one that
builds) and write to a temp file renamed into place. A damaged entry (its checksum differs) is
named in a warning and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from distill_runner import distributed
from distill_runner.storage import DamagedFile, load_verified, save_verified, sha256_of
from distill_runner.store import KeyedStore

log = logging.getLogger(__name__)

FORMAT = 3  # bump when what a cache file holds, or how keys are built, changes (3: data prints)

# What determines the training images, their order and augmentation (with the data's print: each file's
# content hash, label and split, see distill_runner.data.prints).
DATA_INPUTS = (
    "dataset._target_", "dataset.variant", "dataset.root", "dataset.image_size", "dataset.batch_size",
    "dataset.val_fraction", "dataset.test_fraction", "dataset.val_from_train", "dataset.limit",
    "dataset.crop_padding", "dataset.hflip", "dataset.resized_crop_scale", "dataset.balance",
    "dataset.on_bad_image", "dataset.mean", "dataset.std", "dataset.decode_cache", "seed",
)  # fmt: skip
# A fine-tuned teacher, relative to its node (``teacher`` or ``distill.teachers.<name>``), plus the data.
TEACHER_INPUTS = ("model", "weights", "epochs", "optimizer", "scheduler")
# Weight files a model starts from: their content (sha256) is the input, not their path, so an edited
# file is never served a stale teacher or baseline, and a copy of the same file elsewhere reuses it.
TEACHER_FILE_INPUTS = ("checkpoint",)
BASELINE_FILE_INPUTS = ("student.checkpoint",)
TEACHER_SHARED_INPUTS = ("trainer.precision", "eval.test_every_epoch")  # the latter: test/acc in the history
# Teacher inputs added later: in the key only when set (not 0/false), so teachers cached before keep their keys.
TEACHER_INPUTS_WHEN_SET = ("label_smoothing",)
TEACHER_SHARED_INPUTS_WHEN_SET = ("trainer.channels_last", "trainer.compile")
# The scratch baseline: the student and the students' schedule, plus the data.
BASELINE_INPUTS = (
    "student.model", "trainer.epochs", "trainer.optimizer", "trainer.scheduler", "trainer.precision",
    "trainer.channels_last", "trainer.compile", "eval.test_every_epoch",
)  # fmt: skip
# Replayable teacher outputs: the teachers' keys, plus these, the data, the number of views and the recipe's
# teacher summaries (layers and reductions of its feature terms: not config keys, see teacher_outputs_key).
TEACHER_OUTPUTS_INPUTS = ("distill.teacher_weights", "cache.teacher_outputs_dtype", "trainer.precision")
# An evaluation of a cached model: its key, plus these and the device it ran on.
EVAL_INPUTS = ("eval.latency_budget_s", "eval.throughput_budget_s", "eval.cka_samples", "dataset.eval_batch_size")
# A timing session of a run's models: their printed structure, plus these, the image size and where it ran.
SPEED_INPUTS = ("eval.latency_budget_s", "eval.latency_threads", "eval.throughput_budget_s", "dataset.eval_batch_size",
                "dataset.image_size", "trainer.channels_last", "trainer.compile")  # fmt: skip
SPEED_ONLY = ("eval.latency_threads",)  # a key of the timing session alone (SPEED_INPUTS): no other artefact
# Protocol values other keys interpolate (conf/experiment/cifar100_bench.yaml: trainer.optimizer.lr is
# ${student.benchmark_lr}): they reach results only through those keys, which are inputs above.
INTERPOLATED_ONLY = ("teacher.benchmark_lr", "student.benchmark_lr")
# Keys that change this run's own results, which are never cached: the recipe, the export.
RUN_ONLY = ("distill", "export", "reference_teacher")
# Keys that change where things are written, how fast, or what is shown: never a result.
# (data.decode_cache reaches results only through dataset.decode_cache, where a data set has it.)
NOT_RESULTS = (
    "data.decode_cache",
    "hydra", "cache.enabled", "cache.dir", "cache.shared", "cache.max_teacher_outputs_mb", "trainer.device",
    "trainer.progress", "trainer.resume", "data.on_device", "dataset.num_workers", "dataset.pin_memory",
    "dataset.device", "dataset.store_dir", "dataset.progress", "dataset.download", "dataset.name", "teacher.name",
    "student.name", "eval.speed",
)  # fmt: skip


def digest(obj: object) -> str:
    """A short, stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str | None) -> dict | None:
    """What tells a file's content has changed without reading it: resolved path, inode, size, mtime
    and ctime (``cp -p``/``rsync -a``/``tar x`` restore an mtime; no one can set a ctime, and a file
    swapped in by ``mv`` has another inode)."""
    if path is None:
        return None
    stat = Path(path).expanduser().stat()
    return {
        "path": str(Path(path).expanduser().resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": f"{stat.st_dev}:{stat.st_ino}",
    }


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: str) -> str:
    return sha256_of(path)  # the rest: a file changed since is hashed again


def content_digest(path: str | None) -> str | None:
    """The sha256 of a file's content (hashed once per process while the file is unchanged)."""
    if path is None:
        return None
    return _sha256(**file_identity(path))


def file_inputs(cfg: DictConfig, keys, under: str = "") -> dict:
    """``{key: content digest}`` for each of ``keys`` that names a file (keys set to null are left out)."""
    paths = {key: OmegaConf.select(cfg, f"{under}{key}", default=None) for key in keys}
    return {key: content_digest(str(path)) for key, path in paths.items() if path is not None}


def select(cfg: DictConfig, keys, under: str = "") -> dict:
    """``{key: value}`` for each key (missing keys are None), resolved to plain values."""
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, f"{under}{key}", default=None)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def _processes() -> dict:
    """Training on N processes (torchrun) sees N times the batch: another result."""
    n = distributed.world_size()
    return {"processes": n} if n > 1 else {}


def covered(key: str, declared) -> bool:
    """``key`` is one of ``declared`` or lies under one (a declaration names its whole subtree)."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def declared_keys(cfg: DictConfig) -> list[str]:
    """Every key the lists above take in or classify, the nodes of extra teachers included."""
    teachers = ["teacher", *(f"distill.teachers.{n}" for n in (OmegaConf.select(cfg, "distill.teachers") or {}))]
    per_teacher = (*TEACHER_INPUTS, *TEACHER_FILE_INPUTS, *TEACHER_INPUTS_WHEN_SET)
    inputs = [*DATA_INPUTS, *BASELINE_INPUTS, *BASELINE_FILE_INPUTS, *TEACHER_SHARED_INPUTS,
              *TEACHER_SHARED_INPUTS_WHEN_SET, *TEACHER_OUTPUTS_INPUTS,
              *EVAL_INPUTS, *(f"{t}.{k}" for t in teachers for k in per_teacher)]  # fmt: skip
    return [*inputs, *SPEED_ONLY, *RUN_ONLY, *NOT_RESULTS, *INTERPOLATED_ONLY]


def data_inputs(cfg: DictConfig, fingerprint: str | None) -> dict:
    """What determines the training data: its config keys and the data's print (``fingerprint``). A key of a
    data set factory of the user's own (in no list here) counts too: changing it never reuses a teacher."""
    own = [f"dataset.{k}" for k in cfg.dataset if not covered(f"dataset.{k}", (*DATA_INPUTS, *NOT_RESULTS))]
    return {**select(cfg, DATA_INPUTS), **select(cfg, own), "files": fingerprint}


def teacher_key(cfg: DictConfig, node_key: str, fingerprint: str | None) -> str:
    """A fine-tuned teacher: its node's inputs, the content of the checkpoint it starts from, the data, precision."""
    return digest({
        "format": FORMAT,
        "teacher": select(cfg, TEACHER_INPUTS, under=f"{node_key}."),
        "files": file_inputs(cfg, TEACHER_FILE_INPUTS, under=f"{node_key}."),
        "shared": select(cfg, TEACHER_SHARED_INPUTS),
        "data": data_inputs(cfg, fingerprint),
        **_processes(),
        **_when_set(select(cfg, TEACHER_INPUTS_WHEN_SET, under=f"{node_key}.")),
        **_when_set(select(cfg, TEACHER_SHARED_INPUTS_WHEN_SET)),
    })  # fmt: skip


def _when_set(values: dict) -> dict:
    return {k: v for k, v in values.items() if v}


def baseline_key(cfg: DictConfig, fingerprint: str | None) -> str:
    """The scratch baseline: the student, its schedule, the content of ``student.checkpoint`` when set, the data."""
    files = file_inputs(cfg, BASELINE_FILE_INPUTS)  # absent when unset: baselines cached before keep their keys
    return digest({"format": FORMAT, "baseline": select(cfg, BASELINE_INPUTS), "data": data_inputs(cfg, fingerprint),
                   **({"files": files} if files else {}), **_processes()})  # fmt: skip


def teacher_outputs_key(
    cfg: DictConfig, teacher_keys: list[str], fingerprint: str | None, views: int, summaries: dict | None = None
) -> str:
    """Replayable teacher outputs: the teachers, these inputs, the data, the views, and what is stored besides
    logits (``summaries``: the recipe's :meth:`~distill_runner.distill.Recipe.summary_spec`, its feature-reading
    terms' layers and reductions; absent for logits alone, so a logit-only entry never serves a feature recipe)."""
    stored = {"summaries": summaries} if summaries else {}
    return digest({"format": FORMAT, "teachers": teacher_keys, "outputs": select(cfg, TEACHER_OUTPUTS_INPUTS),
                   "data": data_inputs(cfg, fingerprint), "views": views, **stored, **_processes()})  # fmt: skip


def eval_key(cfg: DictConfig, model_key: str, role: str, layers: list[str], device: torch.device) -> str:
    inputs = {"model": model_key, "role": role, "layers": layers, "eval": select(cfg, EVAL_INPUTS)}
    return digest({"format": FORMAT, **inputs, "device": str(device), "threads": torch.get_num_threads()})


def speed_key(cfg: DictConfig, models: dict[str, str], device: torch.device, precision: str, host: dict) -> str:
    """A timing session: each role's model structure (a digest of its repr), the settings, the precision,
    the device, the host and the threads (speed is a property of the machine, not of the weights)."""
    inputs = {"models": models, "settings": select(cfg, SPEED_INPUTS), "precision": precision}
    return digest({"format": FORMAT, **inputs, "device": str(device), **host, "threads": torch.get_num_threads()})


class Cache:
    """A folder of cached artefacts: a :class:`~distill_runner.store.KeyedStore` per kind, each entry a file
    named by its key with its checksum, written under the entry's lock. Its folders are this user's alone
    unless ``shared`` (``cache.shared``): see :mod:`distill_runner.trust`."""

    def __init__(self, root: str | os.PathLike, shared: bool = False):
        self.root, self.shared = Path(root).expanduser(), shared

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Cache | None:
        node = cfg.get("cache")
        return cls(node.dir, bool(node.get("shared", False))) if node is not None and node.enabled else None

    def path(self, kind: str, key: str) -> Path:
        return self.kind(kind).path(key, ".pt")

    def stored_mb(self, kind: str, key: str) -> float | None:
        """The size of the entry's file in MB (2**20 bytes), None when it is not stored."""
        path = self.path(kind, key)
        return path.stat().st_size / 2**20 if path.is_file() else None

    def kind(self, kind: str) -> KeyedStore:
        """The store of one kind of artefact: ``cache.dir/<kind>/``."""
        return KeyedStore(self.root / kind, private=not self.shared)

    @contextmanager
    def locked(self, kind: str, key: str) -> Iterator[Path]:
        """Hold the lock of one entry (waiting for another process that holds it). Under torchrun
        rank 0 holds it for the group: the other ranks follow rank 0 (:meth:`load_shared`)."""
        path = self.path(kind, key)
        if not distributed.is_main():
            yield path
            return
        with self.kind(kind).locked(path.name):
            yield path

    def weights_path(self, kind: str, key: str) -> Path:
        return self.kind(kind).path(key, ".model.pt")

    def load(self, path: Path) -> dict | None:
        """The entry's content, or None if absent or damaged (a damaged entry is rebuilt)."""
        if not path.is_file():
            return None
        try:
            return load_verified(path)
        except DamagedFile as exc:
            log.warning("cache entry %s is damaged (%s); rebuilding it", path, exc.reason)
            return None

    def load_shared(self, path: Path) -> dict | None:
        """:meth:`load` as rank 0 sees it, in every process (a collective under torchrun)."""
        entry = self.load(path) if distributed.is_main() else None
        if distributed.broadcast(entry is not None) and entry is None:
            entry = torch.load(path, map_location="cpu", weights_only=True)  # rank 0 verified it
        return entry

    def store(self, path: Path, content: dict) -> None:
        save_verified(content, path)  # rank 0 alone writes under torchrun

    def fetch(self, kind: str, key: str, build: Callable[[], dict], shared: bool = True) -> tuple[dict, str]:
        """The entry ``kind/key``, built and stored by ``build()`` when absent; and where it came from.
        ``shared``: every process of a torchrun group calls this (a collective); else rank 0 alone."""
        with self.locked(kind, key) as path:
            entry = self.load_shared(path) if shared else self.load(path)
            if entry is not None:
                return entry, f"reused from {path}"
            entry = build()
            self.store(path, entry)
            return entry, f"computed and stored in {path}"

    def fetch_model(self, kind: str, key: str, train: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, str]:
        """A cached model: ``(state_dict, info, source)``, trained by ``train()`` when absent or damaged.
        The weights are stored alone in :meth:`weights_path` (exactly the state_dict, so run folders
        can hard-link it); the entry holds ``info``. A collective under torchrun, like :meth:`fetch`."""
        with self.locked(kind, key) as path:
            weights = self.weights_path(kind, key)
            found = self._load_model(path, weights) if distributed.is_main() else None
            if distributed.broadcast(found is not None):
                if found is None:  # ranks > 0: rank 0 verified both files
                    info = torch.load(path, map_location="cpu", weights_only=True)["info"]
                    found = torch.load(weights, map_location="cpu", weights_only=True), info
                return *found, f"reused from {path}"
            state, info = train()
            self.store(weights, state)  # the weights first: an entry that exists has them
            self.store(path, {"info": info})
            return state, info, f"computed and stored in {path}"

    def _load_model(self, path: Path, weights: Path) -> tuple[dict, dict] | None:
        entry = self.load(path)
        if entry is None:
            return None
        if "model" in entry:  # the previous version's entry holds its weights: give them their own file
            self.store(weights, entry["model"])
            self.store(path, {"info": entry["info"]})
            return entry["model"], entry["info"]
        state = self.load(weights)
        return None if state is None else (state, entry["info"])
