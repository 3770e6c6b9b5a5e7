"""Work a sweep shares: fine-tuned teachers, scratch baselines, replayable teacher outputs and
evaluations, computed once and reused.

Entries live under ``cache.dir/<kind>/<key>.pt``, each with its checksum ``<key>.pt.sha256``; a cached
model's weights are their own file, ``<key>.model.pt``, which run folders hard-link. A key is a digest of
what determines the artefact: the config keys whose declaration in :mod:`distill_runner.spec` says they
affect it (``affects=``; a node declared so is one input, its whole subtree), the content of the weight
files it starts from, and the data's print. Writers hold a file lock (parallel jobs wait for the one that
builds) and write to a temp file renamed into place. A damaged entry (its checksum differs) is named in a
warning and rebuilt; an entry of an earlier FORMAT is never found (its key differs), or, found under its key
but holding what an earlier version stored, is named in one line and rebuilt.

Docs: docs/guide/sweeps-and-cache.md
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

from distill_runner import distributed
from distill_runner.io.storage import DamagedFile, load_verified, save_verified, sha256_of
from distill_runner.io.store import KeyedStore
from distill_runner.schema import Affects, Spec, inputs, is_int, plain
from distill_runner.spec import CacheSpec, RunSpec, TeacherSpec, reference, typed

log = logging.getLogger(__name__)
_UNSET = object()

FORMAT = 4  # bump when what a cache file holds, or how keys are built, changes (4: keys from the schema)

# Keys that change where things are written, how fast, or what is shown: never a result (run folders
# compare the rest when resuming; TensorBoard's HParams leave these out).
NOT_RESULTS = tuple(k.path for k in inputs(RunSpec, Affects.NOTHING))


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


def _at(node, path: str):
    """The typed value at the dotted ``path`` under ``node`` (``_UNSET`` where a node on the way is absent)."""
    for name in path.split("."):
        if node is None:
            return _UNSET
        node = getattr(node, name)
    return node


def _inputs(node: Spec, cls: type[Spec], flag: Affects, skip=()) -> dict:
    """The values of the keys ``cls`` declares to affect ``flag``, read from the typed ``node``: an unset key is its
    default, a whole number given for a float key is that float (unset, 0 and 0.0 label smoothing are one teacher),
    a node declared as one input is its whole subtree. A key that names a weight file enters by its content
    (sha256), so an edited file is never served a stale model and a copy of the same file elsewhere reuses it."""
    out = {}
    for k in inputs(cls, flag, skip):
        value = _at(node, k.path)
        if value is _UNSET:  # under an absent node (no eval node): the key's default
            value = None if k.node or k.default == "(required)" else k.default
        elif isinstance(value, Spec) or k.node:
            value = plain(value)
        elif k.type.startswith("float") and is_int(value):
            value = float(value)
        if k.file and value is not None:
            value = content_digest(str(value))
        if not (k.file and value is None):  # no file: not an input
            out[k.path] = value
    return out


def _processes() -> dict:
    """Training on N processes (torchrun) sees N times the batch: another result."""
    n = distributed.world_size()
    return {"processes": n} if n > 1 else {}


def covered(key: str, declared) -> bool:
    """``key`` is one of ``declared`` or lies under one (a declaration names its whole subtree)."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def data_inputs(spec: RunSpec, fingerprint: str | None) -> dict:
    """What determines the training data: its keys, the keys of a data set factory of the user's own (not
    declared: changing one never reuses a teacher) and the data's print (``fingerprint``)."""
    declared = {k.path for k in reference() if k.path.startswith("dataset.")}
    own = {f"dataset.{k}": v for k, v in spec.dataset.as_dict().items() if f"dataset.{k}" not in declared}
    return {**_inputs(spec, RunSpec, Affects.DATA), **own, "files": fingerprint}


def _teacher(spec: RunSpec, node_key: str) -> TeacherSpec:
    """The teacher node ``teacher`` or ``distill.teachers.<name>``."""
    return spec.teacher if node_key == "teacher" else spec.distill.teachers[node_key.rsplit(".", 1)[1]]


def teacher_key(spec: RunSpec, node_key: str, fingerprint: str | None) -> str:
    """A fine-tuned teacher: its node's keys (``teacher`` or ``distill.teachers.<name>``), the keys that affect
    every teacher, the data."""
    spec = typed(spec)
    return digest({
        "format": FORMAT,
        "teacher": _inputs(_teacher(spec, node_key), TeacherSpec, Affects.TEACHER),
        "shared": _inputs(spec, RunSpec, Affects.TEACHER, skip=(TeacherSpec,)),
        "data": data_inputs(spec, fingerprint),
        **_processes(),
    })  # fmt: skip


def baseline_key(spec: RunSpec, fingerprint: str | None) -> str:
    """The scratch baseline: the student, its schedule, the content of ``student.checkpoint`` when set, the data."""
    spec = typed(spec)
    baseline = _inputs(spec, RunSpec, Affects.BASELINE)
    return digest({"format": FORMAT, "baseline": baseline, "data": data_inputs(spec, fingerprint), **_processes()})


def teacher_outputs_key(
    spec: RunSpec,
    teacher_keys: list[str],
    fingerprint: str | None,
    views: int,
    summaries: dict | None = None,
) -> str:
    """Replayable teacher outputs: the teachers, the keys that affect them, the data, the views, and what is stored
    besides logits (``summaries``: the recipe's :meth:`~distill_runner.distill.Recipe.summary_spec`, its feature-
    reading terms' layers and reductions; absent for logits alone, so a logit-only entry never serves a feature
    recipe)."""
    spec = typed(spec)
    stored = {"summaries": summaries} if summaries else {}
    outputs = _inputs(spec, RunSpec, Affects.OUTPUTS)
    return digest({"format": FORMAT, "teachers": teacher_keys, "outputs": outputs,
                   "data": data_inputs(spec, fingerprint), "views": views, **stored, **_processes()})  # fmt: skip


def eval_key(spec: RunSpec, model_key: str, role: str, layers: list[str], device: torch.device) -> str:
    inputs = {"model": model_key, "role": role, "layers": layers, "eval": _inputs(typed(spec), RunSpec, Affects.EVAL)}
    return digest({"format": FORMAT, **inputs, "device": str(device), "threads": torch.get_num_threads()})


def speed_key(spec: RunSpec, models: dict[str, str], device: torch.device, precision: str, host: dict) -> str:
    """A timing session: each role's model structure (a digest of its repr), the settings, the precision,
    the device, the host and the threads (speed is a property of the machine, not of the weights)."""
    settings = _inputs(typed(spec), RunSpec, Affects.SPEED)
    inputs = {"models": models, "settings": settings, "precision": precision}
    return digest({"format": FORMAT, **inputs, "device": str(device), **host, "threads": torch.get_num_threads()})


class Cache:
    """A folder of cached artefacts: a :class:`~distill_runner.io.store.KeyedStore` per kind, each entry a file
    named by its key with its checksum, written under the entry's lock. Its folders are this user's alone
    unless ``shared`` (``cache.shared``): see :mod:`distill_runner.io.trust`."""

    def __init__(self, root: str | os.PathLike, shared: bool = False):
        self.root, self.shared = Path(root).expanduser(), shared

    @classmethod
    def from_spec(cls, cache: CacheSpec | None) -> Cache | None:
        """The run's cache (``cache.*``); None when it is off."""
        return cls(cache.dir, cache.shared) if cache is not None and cache.enabled else None

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
        if set(entry) != {"info"}:  # e.g. an earlier version's entry that held its weights: trained again
            log.info("cache entry %s is of an earlier cache format (keys %s); rebuilt", path, sorted(entry))
            return None
        state = self.load(weights)
        return None if state is None else (state, entry["info"])
