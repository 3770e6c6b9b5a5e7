"""Work a sweep shares: fine-tuned teachers and their outputs, computed once and reused.

Both caches live under ``cache.dir`` and are keyed by a hash of everything that determines their
content. Writers hold a file lock (jobs of a parallel sweep wait instead of training the same
teacher twice) and write to a temp file that is renamed into place, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from distill_runner.distill.losses import Batch, Outputs
from distill_runner.train import distributed
from distill_runner.train.engine import Precision, atomic_save

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a cache file holds changes


def digest(obj: object) -> str:
    """A short, stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str | None) -> dict | None:
    """What tells a file's content has changed without reading it: resolved path, size, mtime."""
    if path is None:
        return None
    stat = Path(path).expanduser().stat()
    return {"path": str(Path(path).expanduser().resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _processes() -> dict:
    """Training on N processes (torchrun) sees N times the batch: another result. One process adds
    nothing, so keys of single-process runs stay as they were."""
    n = distributed.world_size()
    return {"processes": n} if n > 1 else {}


def dataset_identity(cfg: DictConfig, fingerprint: str | None = None) -> dict:
    """The dataset config without the keys that do not change the images (where the decoded-image
    store lives, progress bars, the evaluation batch size), plus ``fingerprint`` (the image files'
    identity, :attr:`distill_runner.data.bundle.DataBundle.fingerprint`) when there is one."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for irrelevant in ("eval_batch_size", "store_dir", "progress"):
        dataset.pop(irrelevant, None)
    if fingerprint is not None:
        dataset["files"] = fingerprint
    return dataset


def teacher_key(cfg: DictConfig, node: DictConfig, fingerprint: str | None = None) -> str:
    """What determines a fine-tuned teacher: its config (architecture, weights, checkpoint file,
    schedule), the data set (its image files when ``fingerprint`` is given) and its transforms,
    the seed and the numeric precision."""
    teacher = OmegaConf.to_container(node, resolve=True)
    teacher.pop("name", None)
    return digest(
        {
            "format": FORMAT,
            "teacher": teacher,
            "checkpoint": file_identity(node.checkpoint),
            "dataset": dataset_identity(cfg, fingerprint),
            "seed": cfg.seed,
            "precision": str(cfg.trainer.precision),
            **_processes(),
        }
    )


def baseline_key(cfg: DictConfig, fingerprint: str | None = None) -> str:
    """What determines the scratch baseline: the student, its schedule, the data, seed, precision."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for irrelevant in ("device", "progress"):
        trainer.pop(irrelevant, None)
    student = OmegaConf.to_container(cfg.student.model, resolve=True)
    return digest(
        {
            "format": FORMAT,
            "student": student,
            "trainer": trainer,
            "dataset": dataset_identity(cfg, fingerprint),
            "seed": cfg.seed,
            **_processes(),
        }
    )


class Cache:
    """A folder of cached artefacts, each a file named by its key, written under a lock."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Cache | None:
        node = cfg.get("cache")
        return cls(node.dir) if node is not None and node.enabled else None

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    @contextmanager
    def locked(self, kind: str, key: str) -> Iterator[Path]:
        """Hold the lock of one entry (waiting for another process that holds it). Under torchrun
        rank 0 holds it for the group: the other ranks follow rank 0 (:meth:`load_shared`)."""
        path = self.path(kind, key)
        if not distributed.is_main():
            yield path
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            yield path

    def load(self, path: Path) -> dict | None:
        """The entry's content, or None if absent or unreadable (a damaged entry is rebuilt)."""
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("cache entry %s is unreadable (%s); rebuilding it", path, exc)
            return None

    def load_shared(self, path: Path) -> dict | None:
        """:meth:`load` as rank 0 sees it, in every process (a collective under torchrun)."""
        entry = self.load(path) if distributed.is_main() else None
        if distributed.broadcast(entry is not None) and entry is None:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        return entry

    def store(self, path: Path, content: dict) -> None:
        atomic_save(content, path)  # rank 0 alone writes under torchrun


class CachedTeacher:
    """Teacher signal replayed from precomputed logits: ``logits[view, index]``.

    Epoch ``e`` replays view ``e % views``; with one view per epoch it is exactly the online
    teacher on the same augmented batches (up to the storage dtype).
    """

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # [views, N, classes]
        self.view = 0

    def to(self, device: torch.device) -> CachedTeacher:
        self.logits = self.logits.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.logits.shape[0]

    def __call__(self, batch: Batch) -> Outputs:
        index = batch["index"].to(self.logits.device)
        return {"logits": self.logits[self.view, index].float()}


@torch.inference_mode()
def compute_teacher_logits(
    teacher,
    train,
    views: int,
    device: torch.device,
    precision: Precision,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> torch.Tensor:
    """The online teacher signal's logits for every training image under the augmentation of
    epochs 0..views-1 (the loader replays an epoch's augmentation from the seed):
    [views, N, classes]. Runs in ``precision`` (mixed precision where enabled)."""
    teacher = teacher.to(device)
    logits = None
    bar = tqdm(
        total=views * len(train),
        desc="teacher outputs",
        leave=False,
        disable=not (progress and distributed.is_main()),
        dynamic_ncols=True,
    )
    for view in range(views):
        train.set_epoch(view)
        for batch in train:  # under torchrun: this process's shard
            with precision.autocast():
                out = teacher({"image": batch["image"].to(device, non_blocking=True)})["logits"].float()
            if logits is None:
                logits = torch.zeros(views, train.num_samples, out.shape[1], dtype=torch.float32)
                filled = torch.zeros(views, train.num_samples, dtype=torch.float32)
            logits[view, batch["index"].cpu()] = out.cpu()
            filled[view, batch["index"].cpu()] = 1.0
            bar.update()
    bar.close()
    if distributed.active():  # every process computed its shard: put them together
        logits, filled = distributed.sum_over_processes(logits), distributed.sum_over_processes(filled)
        logits = logits / filled.clamp_min(1)[..., None]  # shards overlap where the last one was padded
    return logits.to(dtype)


def replayed_teacher_signal(ctx, online, teacher_id: str, recipe) -> object:
    """The teacher signal for the distill stage: replayed from cached logits where that is exact
    (``distill.teacher_outputs=cached``), else the online teacher."""
    cfg, train = ctx.cfg, ctx.data.train
    mode = cfg.distill.get("teacher_outputs", "cached")  # cached wherever it is exact
    if mode == "online" or not getattr(recipe, "needs_teacher", True):
        return online
    why_not = None
    if not getattr(train, "replayable", False):
        why_not = "the training loader cannot replay its augmentation"
    elif getattr(recipe, "teacher_layers", None):
        why_not = "the recipe needs teacher features, which are not cached"
    else:
        views = min(cfg.trainer.epochs, getattr(train, "distinct_epochs", None) or cfg.trainer.epochs)
        dtype = getattr(torch, cfg.cache.teacher_outputs_dtype)
        size_mb = views * train.num_samples * ctx.data.num_classes * dtype.itemsize / 2**20
        if size_mb > cfg.cache.max_teacher_outputs_mb:
            why_not = (
                f"they would take {size_mb:.0f} MB > cache.max_teacher_outputs_mb={cfg.cache.max_teacher_outputs_mb}"
            )
    if why_not is not None:
        log.info("teacher outputs: online (%s)", why_not)
        return online

    def compute() -> torch.Tensor:
        return compute_teacher_logits(
            online, train, views, ctx.device, ctx.precision, dtype, progress=cfg.trainer.progress
        )

    dataset = dataset_identity(cfg, ctx.data.fingerprint)
    key = digest(
        {
            "teacher": teacher_id,
            "dataset": dataset,
            "seed": cfg.seed,
            "views": views,
            "dtype": str(dtype),
            "precision": ctx.precision.name,
        }
    )
    cache = Cache.from_config(cfg)
    start = time.perf_counter()
    if cache is None:
        logits = compute()
        source = "computed"
    else:
        with cache.locked("teacher_outputs", key) as path:
            entry = cache.load_shared(path)
            if entry is None:
                logits = compute()
                cache.store(path, {"logits": logits})
                source = f"computed and stored in {path}"
            else:
                logits = entry["logits"]
                source = f"reused from {path}"
    log.info(
        "teacher outputs: cached, %d augmented views x %d images x %d classes as %s = %.1f MB, %s (%.1fs)",
        views,
        train.num_samples,
        ctx.data.num_classes,
        cfg.cache.teacher_outputs_dtype,
        size_mb,
        source,
        time.perf_counter() - start,
    )
    return CachedTeacher(logits)
