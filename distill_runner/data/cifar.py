"""CIFAR-10 and CIFAR-100 through torchvision, held in memory as one uint8 tensor.

torchvision's ``CIFAR10``/``CIFAR100`` classes read (and, with ``download``, fetch) the official
python-pickle files and check their MD5 sums. The 50,000 + 10,000 images (32x32x3 uint8, 180 MB)
are then batched by :class:`distill_runner.data.bundle.TensorBatches` with the standard augmentation
(random crop 32 with padding 4, horizontal flip) drawn per (seed, epoch).

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill_runner.data.bundle import (
    Augment,
    DataBundle,
    check_classes,
    in_memory_bundle,
    stratified_split,
    take_per_class,
)
from distill_runner.data.prints import DataPrint, HashIndex
from distill_runner.data.scan import split_problem
from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)

VARIANTS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def cifar(
    variant: str = "cifar10",
    root: str = "data",
    download: bool = True,
    image_size: int = 32,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    val_from_train: float = 0.1,
    balance: str = "none",
    crop_padding: int = 4,
    hflip: bool = True,
    mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
    std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    limit: int | None = None,
    seed: int = 0,
    name: str | None = None,
    store_dir: str | None = None,
) -> DataBundle:
    """CIFAR-10/100: train/test as published; ``val_from_train`` (a fraction, stratified, seeded)
    of the training images become the validation split; 0 trains on all of them and validates on the
    test split, as the CIFAR benchmarks' code does (then epoch selection has seen the test images).
    Images are resized in memory when ``image_size`` is not 32. ``limit`` keeps N images per split,
    every class represented. The data print (what cached teachers and baselines are keyed by) holds the
    content hash of each batch file and its split; ``store_dir``: where those hashes are kept (None:
    hashed every run, as torchvision's MD5 check reads them anyway)."""
    import torchvision.datasets

    _check_variant(variant)
    cls = getattr(torchvision.datasets, VARIANTS[variant])
    train_set, test_set = _load(cls, Path(root).expanduser(), download)
    train_idx, val_idx, test_idx = _split(train_set, test_set, val_from_train, seed, limit, variant)
    images, targets, splits = _gather(train_set, test_set, train_idx, val_idx, test_idx, val_from_train)
    images = _resized(images, image_size)
    counts = {s: np.bincount(targets.numpy()[i], minlength=len(train_set.classes)).tolist() for s, i in splits.items()}
    fix = f"the {variant} files look incomplete: download them again (dataset.download=true)"
    check_classes(counts, train_set.classes, "root", str(root), fix, limited=limit is not None)
    return in_memory_bundle(
        images.contiguous(),
        targets,
        splits,
        class_names=list(train_set.classes),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        augment=Augment(crop_padding, hflip),
        seed=seed,
        name=name or variant,
        mean=list(mean),
        std=list(std),
        balance=balance,
        limited=limit is not None,
        fingerprint=batch_files_print(cls, Path(root).expanduser(), store_dir).digest,
    )


def _check_variant(variant: str) -> None:
    """The one setting of this factory the schema leaves to it (``val_from_train``'s range is the schema's)."""
    if variant not in VARIANTS:
        raise ConfigError("variant", variant, f"use one of {', '.join(VARIANTS)}")


def _split(
    train_set, test_set, val_from_train: float, seed: int, limit: int | None, variant: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions: val carved from the training set (stratified, seeded; none when
    ``val_from_train`` is 0), each kept to ``limit`` images, every class represented."""
    train_targets = np.asarray(train_set.targets)
    problem = split_problem(train_targets, val_from_train, train_set.classes) if val_from_train > 0 else None
    if problem is not None:  # too few images per class (only with partial files)
        raise ConfigError("val_from_train", val_from_train, f"the val split carved from the train split {problem}")
    val_idx, train_idx = (
        stratified_split(train_targets, [val_from_train], seed)
        if val_from_train > 0
        else (np.arange(0), np.arange(len(train_targets)))
    )
    test_idx = np.arange(len(test_set.targets))
    if limit is not None:
        train_idx = train_idx[take_per_class(train_targets[train_idx], limit)]
        val_idx = val_idx[take_per_class(train_targets[val_idx], limit)]
        test_idx = test_idx[take_per_class(np.asarray(test_set.targets), limit)]
    if val_from_train > 0:
        log.info(
            "%s: validation split = %.0f%% of train (stratified, seed %d): %d images",
            variant,
            100 * val_from_train,
            seed,
            len(val_idx),
        )
    else:
        log.info("%s: val_from_train=0: training on all %d training images, validating on the test split", variant,
                 len(train_idx))  # fmt: skip
    return train_idx, val_idx, test_idx


def _gather(
    train_set, test_set, train_idx: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray, val_from_train: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """(uint8 images [N,3,32,32], targets, rows of each split): train then test images, without those no
    split uses (``limit``), each once (val may be the test split)."""
    n_train = len(train_set.targets)
    images = torch.from_numpy(np.concatenate([train_set.data, test_set.data])).permute(0, 3, 1, 2)
    targets = np.concatenate([np.asarray(train_set.targets), np.asarray(test_set.targets)])
    targets = torch.as_tensor(targets, dtype=torch.long)
    val = val_idx if val_from_train > 0 else test_idx + n_train
    splits = {"train": train_idx, "val": val, "test": test_idx + n_train}
    keep = np.concatenate(list(splits.values()))
    keep = keep[np.sort(np.unique(keep, return_index=True)[1])]  # each image once (val may be the test split)
    if len(keep) < len(targets):  # limit: drop what no split uses before any resizing
        remap = np.full(len(targets), -1)
        remap[keep] = np.arange(len(keep))
        images, targets = images[torch.as_tensor(keep)], targets[torch.as_tensor(keep)]
        splits = {s: remap[i] for s, i in splits.items()}
    return images, targets, splits


def _resized(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """``images`` at ``image_size`` (bilinear, antialiased, rounded back to uint8); as they are at 32."""
    if image_size == images.shape[-1]:
        return images
    resized = F.interpolate(
        images.float(), size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def batch_files_print(cls, root: Path, store_dir: str | None) -> DataPrint:
    """Per batch file (train, test, then meta): its content hash and split; the labels are inside the files."""
    files = [(name, "train") for name, _ in cls.train_list] + [(name, "test") for name, _ in cls.test_list]
    files.append((cls.meta["filename"], "meta"))
    paths = [str(root / cls.base_folder / name) for name, _ in files]
    hashes = HashIndex(store_dir).sha256(paths)
    return DataPrint(tuple((h, "", split) for h, (_, split) in zip(hashes, files)), tuple(n for n, _ in files))


def _load(cls, root: Path, download: bool):
    """torchvision's train and test sets, or a ConfigError saying where the files go."""
    folder, archive, url = cls.base_folder, cls.filename, cls.url
    where = (
        f"put {archive} (from {url}) or its extracted {folder}/ folder in {root.resolve()}"
        f" (so that {root.resolve() / folder}/ exists)"
    )
    if not download and (root / archive).is_file() and not (root / folder).is_dir():
        _extract(root / archive, cls.tgz_md5)
    if download:
        try:
            cls(str(root), train=True, download=True)
        except Exception as exc:  # URLError, timeouts, a bad MD5 after download, a full disk, ...
            raise ConfigError(
                "download",
                True,
                f"downloading {url} failed ({type(exc).__name__}: {exc}); offline, {where}, "
                "then run with dataset.download=false",
            ) from None
    try:
        return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:  # missing or corrupted files (torchvision checks MD5 sums)
        state = "in it are incomplete or corrupted (MD5 mismatch)" if (root / folder).is_dir() else "are missing"
        raise ConfigError(
            "root", str(root), f"the {cls.__name__} files {state}: {where}, or set dataset.download=true to fetch them"
        ) from None


def _extract(path: Path, md5: str) -> None:
    """Unpack a CIFAR archive the user placed by hand (download=false), after checking its MD5."""
    import torchvision.datasets.cifar as tv_cifar  # check_integrity looked up here, as torchvision does
    from torchvision.datasets.utils import extract_archive

    if not tv_cifar.check_integrity(str(path), md5):
        raise ConfigError(
            "root", str(path.parent), f"{path.name} is incomplete or corrupted (MD5 mismatch): download it again"
        )
    log.info("extracting %s", path)
    extract_archive(str(path), str(path.parent))
