"""ImageFolder data sets: the chest X-ray set and any folder of class sub-folders.

Layouts (``root`` is what the user passes as ``dataset.root``)::

    root/train/<class>/*.jpg  root/val/<class>/...  root/test/<class>/...   (split layout)
    root/<class>/*.jpg                                                       (single folder)

The split layout is used when ``root/train`` exists; ``val/`` may be missing when
``val_from_train`` carves a stratified, seeded validation split from train. A single folder is
split by ``test_fraction`` and ``val_from_train`` (stratified, seeded).

Files are scanned up front (:mod:`distill_runner.data.scan`): hidden files and files without an
image extension (``.DS_Store``, ``Thumbs.db``, notes) are ignored; image files in sub-folders of a
class folder are not used and named in a warning; every image file is checked with PIL's
``Image.verify()`` (the header and, for PNG, the chunk checksums, without decoding the pixels).
A file that passes that check can still fail to decode (a truncated JPEG or PNG): the store build
decodes every file anyway and records those, and without the store every file is decoded once up
front (:func:`distill_runner.data.images.undecodable`), so epochs
never meet a bad file and stay reproducible. Bad files of either kind are skipped with one
warning naming them (``on_bad_image=skip``) or refused in one line (``on_bad_image=error``).
Then, before any model is built, every split must still hold every class, and there must be at
least two classes (:func:`distill_runner.data.bundle.check_classes`), else one line names the
split, the class and the fix.

Every file is converted to 8 bits the same way in both paths below
(:func:`distill_runner.data.images.to_8bit`: upright by EXIF orientation; 16-bit and float
images scaled by their range, not clipped; alpha dropped; the first frame of an animation).

Loading (``decode_cache``, on by default; ``data.decode_cache`` in the config): the files are
decoded, converted and resized once into a memory-mapped uint8 store under ``store_dir``
(:mod:`distill_runner.data.decode_cache`; 1 channel when every image is grayscale), and the splits are
:class:`distill_runner.data.bundle.TensorBatches` over it: batches by indexing, augmentation
(``resized_crop_scale``, ``hflip``) as batched tensor ops drawn from (seed, epoch), no worker
processes; epochs replay exactly, so cached teacher outputs work.

Without the store (``decode_cache=false``, or a full disk) loading is torchvision's
``ImageFolder`` (PIL, :func:`~distill_runner.data.images.load_rgb`: grayscale becomes 3 channels) with a
``DataLoader``, the same resize and the equivalent torchvision transforms (``RandomResizedCrop``
with the same ranges, then the flip). Its sampler draws the order and one augmentation seed per
sample from (seed, epoch), so an epoch's batches and augmentations are the same whatever the
number of workers (:meth:`FolderBatches.set_epoch`), but they are not replayable as a batch, so
the teacher runs online. Both paths normalize each batch with ``mean``/``std``.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from distill_runner.data.augment import RATIO, Augment
from distill_runner.data.bundle import (
    DataBundle,
    balance_weights,
    in_memory_bundle,
    take_per_class,
)
from distill_runner.data.decode_cache import INTERPOLATION, Store, open_or_build
from distill_runner.data.folder_batches import Folder, FolderBatches
from distill_runner.data.images import undecodable
from distill_runner.data.prints import HashIndex
from distill_runner.data.scan import (
    SPLITS,
    Layout,
    carve_splits,
    check_folder_classes,
    drop_bad,
    folder_print,
    unreadable,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loader_settings(num_workers: int | str, pin_memory: bool | str, device: str) -> tuple[int, bool]:
    """``auto``: on CUDA, up to 8 workers (one core left for the main process) and pinned memory;
    on a CPU, half the cores (the other half trains), no pinning."""
    cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers == "auto":
        num_workers = min(8, cores - 1) if cuda else min(4, cores // 2)
    if pin_memory == "auto":
        pin_memory = cuda
    return max(0, num_workers), bool(pin_memory)


def imagefolder(
    root: str | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    val_from_train: float | None = None,
    test_fraction: float = 0.2,
    balance: str = "none",
    on_bad_image: str = "skip",
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_workers: int | str = "auto",
    pin_memory: bool | str = "auto",
    device: str = "auto",
    limit: int | None = None,
    source: str | None = None,
    classes_hint: Sequence[str] | None = None,
    resized_crop_scale: Sequence[float] | None = None,
    decode_cache: bool = True,
    store_dir: str = "outputs/cache/decoded",
    progress: bool = True,
    seed: int = 0,
    name: str = "imagefolder",
) -> DataBundle:
    """Any ImageFolder: resize to ``image_size`` square; for training a random resized crop
    (``resized_crop_scale``: [lo, hi] area fraction, aspect ratio in [3/4, 4/3]; null: none) and
    a random horizontal flip (``hflip``); normalize with ``mean``/``std`` (ImageNet's by default).
    ``decode_cache``: decode once into a store under ``store_dir`` (``progress``: its tqdm bar),
    else with PIL every epoch by ``num_workers`` DataLoader workers. ``source`` and
    ``classes_hint`` only word the error messages (where the data comes from, its class folders).
    ``limit`` keeps N images per split, every class represented (smoke tests)."""
    augment = Augment(hflip=hflip, resized_crop_scale=resized_crop_scale)  # every setting: checked by the schema
    workers, pin = loader_settings(num_workers, pin_memory, device)
    layout = Layout(root, source, classes_hint, val_from_train)
    classes, samples = _scan(layout, val_from_train, test_fraction, seed, limit, on_bad_image)
    files = sorted({p for items in samples.values() for p, _ in items})
    # content hashes (what the store's and the cache's keys hold), kept beside the store; without the store
    # nothing is written: they are hashed every run, which costs less than the decoding of one epoch
    index_dir = store_dir if decode_cache else None
    hashes = dict(zip(files, HashIndex(index_dir).sha256(files)))
    store = None
    if decode_cache:  # rows ordered by content: a renamed file or a moved symlink reuses the store
        files = sorted(files, key=lambda p: (hashes[p], p))
        store = open_or_build(files, image_size, store_dir, progress, hashes=[hashes[p] for p in files])
    bad = store.undecodable if store is not None else _decode_each_once(files)  # the build recorded them
    samples = drop_bad(samples, bad, on_bad_image, layout, "undecodable (truncated or corrupt pixel data)")
    check_folder_classes(samples, classes, layout, on_bad_image)
    settings = (val_from_train, test_fraction, limit, on_bad_image, seed)
    fingerprint = folder_print(samples, classes, layout, hashes, index_dir, settings).digest
    batching = Batching(batch_size, eval_batch_size, augment, mean, std, balance, seed, name, fingerprint,
                        layout.describe(val_from_train, test_fraction, seed))  # fmt: skip
    if store is not None:
        return _store_bundle(store, files, samples, classes, batching)
    return _pil_bundle(samples, classes, batching, image_size, workers, pin)


@dataclass(frozen=True)
class Batching:
    """How the splits are batched and described, whichever loader serves them."""

    batch_size: int
    eval_batch_size: int
    augment: Augment
    mean: Sequence[float]
    std: Sequence[float]
    balance: str
    seed: int
    name: str
    fingerprint: str
    layout: str  # the layout and its splits, in words (:meth:`Layout.describe`)


def _scan(
    layout: Layout, val_from_train: float | None, test_fraction: float, seed: int, limit: int | None, on_bad_image: str
) -> tuple[list[str], dict[str, list]]:
    """The classes and each split's ``(path, class index)`` samples: scanned, carved, limited, the unreadable
    files dropped (or refused), every split still holding every class; before anything is decoded."""
    classes, samples = layout.scan_splits()
    samples = carve_splits(samples, classes, layout, val_from_train, test_fraction, seed)
    if limit is not None:
        samples = {
            s: [items[i] for i in take_per_class(np.array([t for _, t in items]), limit)]
            for s, items in samples.items()
        }
    samples = drop_bad(samples, unreadable(samples), on_bad_image, layout, "unreadable")
    check_folder_classes(samples, classes, layout, on_bad_image)
    return classes, samples


def _decode_each_once(files: list[str]) -> dict[str, str]:
    """Without the store: decode each file once now, so that no epoch meets a truncated file."""
    start = time.perf_counter()
    bad = undecodable(files)
    log.info(
        "decoded %d image files once to find truncated ones in %.1fs: %d failed",
        len(files),
        time.perf_counter() - start,
        len(bad),
    )
    return bad


def _store_bundle(store: Store, files: list[str], samples: dict, classes: list[str], b: Batching) -> DataBundle:
    """Every split as TensorBatches over the store's rows (3 channels for the model either way)."""
    row = {p: i for i, p in enumerate(files)}
    targets = torch.zeros(len(files), dtype=torch.long)
    splits = {}
    for split, items in samples.items():
        splits[split] = np.array([row[p] for p, _ in items], dtype=np.int64)
        targets[torch.from_numpy(splits[split])] = torch.tensor([t for _, t in items], dtype=torch.long)
    data = in_memory_bundle(
        store.images,
        targets,
        splits,
        list(classes),
        b.batch_size,
        b.eval_batch_size,
        b.augment,
        b.seed,
        b.name,
        list(b.mean),
        list(b.std),
        b.balance,
        channels=3,
        fingerprint=b.fingerprint,
    )
    log.info(
        "%s: %s, from the decoded-image store (%d channel%s), balance=%s%s",
        b.name,
        b.layout,
        store.images.shape[1],
        "" if store.images.shape[1] == 1 else "s",
        b.balance,
        f" (class weights {[round(w, 3) for w in data.class_weights]})" if data.class_weights else "",
    )
    return data


def _pil_transforms(image_size: int, augment: Augment) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) per-sample transforms: PIL resize (+ resized crop, flip) to uint8 tensors; float and
    normalization come per batch (:class:`FolderBatches`)."""
    resize = v2.Resize((image_size, image_size), interpolation=INTERPOLATION)
    scale = augment.resized_crop_scale
    crop = [v2.RandomResizedCrop(image_size, scale=scale, ratio=RATIO, interpolation=INTERPOLATION)] if scale else []
    flip = [v2.RandomHorizontalFlip()] if augment.hflip else []
    return v2.Compose([resize, *crop, *flip, v2.PILToTensor()]), v2.Compose([resize, v2.PILToTensor()])


def _pil_folders(samples: dict, classes: list[str], image_size: int, augment: Augment) -> dict[str, Folder]:
    """Per split, torchvision's ImageFolder over the split's folder, restricted to its files, in their order."""
    train_tf, eval_tf = _pil_transforms(image_size, augment)
    folders = {}
    for split, items in samples.items():
        folder = Folder(Path(items[0][0]).parent.parent, classes, {p for p, _ in items}, eval_tf)
        position = {p: i for i, (p, _) in enumerate(folder.samples)}
        folders[split] = folder.subset([position[p] for p, _ in items], train_tf if split == "train" else eval_tf)
    return folders


def _pil_bundle(samples: dict, classes: list[str], b: Batching, image_size: int, workers: int, pin: bool) -> DataBundle:
    """Every split as FolderBatches: decoded with PIL every epoch by ``workers`` DataLoader workers."""
    folders = _pil_folders(samples, classes, image_size, b.augment)
    train_targets = torch.as_tensor(folders["train"].targets, dtype=torch.long)
    class_weights, sample_weights = balance_weights(b.balance, train_targets, len(classes))
    counts = {s: np.bincount(f.targets, minlength=len(classes)).tolist() for s, f in folders.items()}
    log.info(
        "%s: %s, decoded with PIL every epoch by %d loader workers, pin_memory=%s, balance=%s%s",
        b.name,
        b.layout,
        workers,
        pin,
        b.balance,
        f" (class weights {[round(w, 3) for w in class_weights]})" if class_weights else "",
    )
    loader = dict(seed=b.seed, num_workers=workers, pin_memory=pin, mean=b.mean, std=b.std, image_size=image_size)
    random = not b.augment.is_identity
    return DataBundle(
        train=FolderBatches(
            folders["train"], b.batch_size, True, sample_weights=sample_weights, random_augment=random, **loader
        ),
        val=FolderBatches(folders["val"], b.eval_batch_size, False, **loader),
        test=FolderBatches(folders["test"], b.eval_batch_size, False, **loader),
        num_classes=len(classes),
        class_names=list(classes),
        image_size=image_size,
        in_channels=3,
        name=b.name,
        class_counts={s: counts[s] for s in SPLITS},
        class_weights=class_weights,
        fingerprint=b.fingerprint,
    )


def chest_xray(
    root: str = "data/chest_xray", val_from_train: float | None = 0.1, name: str = "chest_xray", **kwargs
) -> DataBundle:
    """Kaggle's "Chest X-Ray Images (Pneumonia)": ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``."""
    kwargs.setdefault(
        "source",
        'Kaggle "Chest X-Ray Images (Pneumonia)" (kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia); '
        "unzip it and point dataset.root at its chest_xray/ folder",
    )
    kwargs.setdefault("classes_hint", ["NORMAL", "PNEUMONIA"])
    return imagefolder(root=root, val_from_train=val_from_train, name=name, **kwargs)
