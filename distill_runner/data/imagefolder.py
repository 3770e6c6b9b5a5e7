"""ImageFolder data sets: the chest X-ray set and any folder of class sub-folders.

Layouts (``root`` is what the user passes as ``dataset.root``)::

    root/train/<class>/*.jpg  root/val/<class>/...  root/test/<class>/...   (split layout)
    root/<class>/*.jpg                                                       (single folder)

The split layout is used when ``root/train`` exists; ``val/`` may be missing when
``val_from_train`` carves a stratified, seeded validation split from train. A single folder is
split by ``test_fraction`` and ``val_from_train`` (stratified, seeded).

Files are scanned up front: hidden files and files without an image extension (``.DS_Store``,
``Thumbs.db``, notes) are ignored; every image file is opened and checked with PIL's
``Image.verify()`` (reads the header and, for PNG, checks the chunk checksums, without decoding
the pixels). Files that fail are skipped with one warning listing them (``on_bad_image=skip``) or
stop the run (``on_bad_image=error``). A file that passes the check but fails to decode later (a
truncated JPEG) stops the run with an error naming it.

Loading (``decode_cache``, on by default; ``data.decode_cache`` in the config): the files are
decoded, converted and resized once into a memory-mapped uint8 store under ``store_dir``
(:mod:`distill_runner.data.decode_cache`; 1 channel when every image is grayscale), and the splits are
:class:`distill_runner.data.bundle.TensorBatches` over it: batches by indexing, augmentation
(``resized_crop_scale``, ``hflip``) as batched tensor ops drawn from (seed, epoch), no worker
processes; epochs replay exactly, so cached teacher outputs work.

Without the store (``decode_cache=false``, or a full disk) loading is torchvision's
``ImageFolder`` (PIL, converted to RGB: grayscale becomes 3 channels, alpha is dropped) with a
``DataLoader``, the same resize and the equivalent torchvision transforms (``RandomResizedCrop``
with the same ranges, then the flip). Its sampler draws the order and one augmentation seed per
sample from (seed, epoch), so an epoch's batches and augmentations are the same whatever the
number of workers (:meth:`FolderBatches.set_epoch`), but they are not replayable as a batch, so
the teacher runs online. Both paths normalize each batch with ``mean``/``std``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from distill_runner.data.augment import RATIO, Augment
from distill_runner.data.bundle import (
    BALANCE,
    DataBundle,
    balance_weights,
    check_choice,
    in_memory_bundle,
    shard_order,
    shard_size,
    stratified_split,
    take_per_class,
)
from distill_runner.data.decode_cache import INTERPOLATION, Store, fingerprint, open_or_build
from distill_runner.errors import BadImageError, ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
MAX_LISTED = 10  # bad files named in one warning or error


class _Folder(datasets.ImageFolder):
    """torchvision's ImageFolder over a checked file list, yielding the runner's batch dicts.

    ``dataset[(i, aug_seed)]`` applies the transform with the torch RNG seeded by ``aug_seed``
    (random transforms become reproducible per sample and epoch); ``dataset[i]`` uses seed 0.
    """

    def __init__(self, root: Path, classes: list[str], files: set[str], transform):
        self._classes = classes
        super().__init__(str(root), transform=transform, is_valid_file=files.__contains__, allow_empty=True)

    def find_classes(self, directory):  # the scanned class folders (no hidden folders)
        return self._classes, {c: i for i, c in enumerate(self._classes)}

    def __getitem__(self, item) -> dict:
        index, aug_seed = item if isinstance(item, tuple) else (item, 0)
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as exc:  # truncated JPEG and other decode errors
            raise BadImageError(
                f"{path} could not be decoded ({type(exc).__name__}: {exc}); remove or replace the file"
            ) from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            image = self.transform(image)
        return {"image": image, "target": target, "index": index}

    def subset(self, positions: Sequence[int], transform) -> _Folder:
        """The same data set restricted to ``positions`` (indices restart at 0), with ``transform``."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in positions]
        part.imgs, part.targets = part.samples, [t for _, t in part.samples]
        part.transform = transform
        return part


class _EpochSampler(Sampler):
    """Yields ``(index, augmentation seed)`` pairs: shuffled, or drawn with replacement by
    ``weights``, from a generator seeded by (seed, epoch); in order when not shuffling."""

    def __init__(self, n: int, shuffle: bool, seed: int, weights: torch.Tensor | None = None):
        self.n, self.shuffle, self.seed, self.weights, self.epoch = n, shuffle, seed, weights, 0
        self.rank, self.world_size, self.pad = 0, 1, True

    def __len__(self) -> int:
        return shard_size(self.n, self.rank, self.world_size, self.pad)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=gen)
        mine = shard_order(torch.arange(self.n), self.rank, self.world_size, self.pad)  # DDP: this process's positions
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


class FolderBatches:
    """A DataLoader over an ImageFolder split, with ``set_epoch`` like :class:`TensorBatches`.

    Workers return uint8 images (4x less to pass between processes); each batch is converted to
    float and normalized with ``mean``/``std`` here, in one vectorized step, then pinned when
    ``pin_memory`` (for asynchronous copies to the GPU)."""

    def __init__(
        self,
        dataset: _Folder,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int,
        pin_memory: bool,
        mean: Sequence[float],
        std: Sequence[float],
        sample_weights: torch.Tensor | None = None,
    ):
        self.dataset, self.batch_size = dataset, batch_size
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.sampler = _EpochSampler(len(dataset), shuffle, seed, sample_weights)
        self.pin_memory = pin_memory
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    @property
    def targets(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.targets, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def shard(self, rank: int, world_size: int, pad: bool = True) -> None:
        """Load only this process's part of every epoch (DDP; see :func:`data.shard_order`)."""
        self.sampler.rank, self.sampler.world_size, self.sampler.pad = rank, world_size, pad

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            batch["image"] = (batch["image"].float() - self.mean) / self.std
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch


def loader_settings(num_workers: int | str, pin_memory: bool | str, device: str) -> tuple[int, bool]:
    """``auto``: on CUDA, up to 8 workers (one core left for the main process) and pinned memory;
    on a CPU, half the cores (the other half trains), no pinning."""
    cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers == "auto":
        num_workers = min(8, cores - 1) if cuda else min(4, cores // 2)
    elif not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ConfigError("num_workers", num_workers, "use auto or an integer >= 0 (0 = load in the main process)")
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
    check_choice("balance", balance, BALANCE)
    try:
        augment = Augment(hflip=hflip, resized_crop_scale=resized_crop_scale)
    except ValueError:
        raise ConfigError(
            "resized_crop_scale", resized_crop_scale, "use null or [lo, hi] with 0 < lo <= hi <= 1, e.g. [0.8, 1.0]"
        ) from None
    check_choice("on_bad_image", on_bad_image, ("skip", "error"))
    if val_from_train is not None and not (isinstance(val_from_train, (int, float)) and 0 < val_from_train < 1):
        raise ConfigError(
            "val_from_train", val_from_train, "use null (use the val/ split) or a fraction in (0, 1), e.g. 0.1"
        )
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be a positive integer")
    workers, pin = loader_settings(num_workers, pin_memory, device)
    layout = Layout(root, source, classes_hint, val_from_train)

    scanned = {split: layout.scan(split) for split in layout.splits}  # split -> (classes, [(path, class index)])
    classes = scanned[layout.splits[0]][0]
    for split, (found, _) in scanned.items():
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise ConfigError(
                "root",
                layout.display,
                f"class folders differ between splits: train has {classes}, {split} has {found}"
                f" (missing in {split}: {missing or 'none'}; only in {split}: {extra or 'none'}); every split needs the same class folders",
            )
    samples = {split: items for split, (_, items) in scanned.items()}
    samples = _carve_splits(samples, layout, val_from_train, test_fraction, seed)
    if limit is not None:
        samples = {
            s: [items[i] for i in take_per_class(np.array([t for _, t in items]), limit)]
            for s, items in samples.items()
        }
    samples = _drop_bad_images(samples, on_bad_image, layout)
    for split, items in samples.items():
        if not items:
            raise ConfigError("root", layout.display, f"the {split} split has no readable images left")
        counts = np.bincount([t for _, t in items], minlength=len(classes))
        if split == "train" and (counts == 0).any():  # a class lost all its training images to the check
            raise ConfigError(
                "root", layout.display, f"class {classes[int(np.argmin(counts))]} has no readable training images left"
            )

    files = sorted({p for items in samples.values() for p, _ in items})
    store = open_or_build(files, image_size, store_dir, progress=progress) if decode_cache else None
    if store is not None:
        return _store_bundle(
            store,
            files,
            samples,
            classes,
            layout.describe(val_from_train, test_fraction, seed),
            augment,
            batch_size,
            eval_batch_size,
            mean,
            std,
            balance,
            seed,
            name,
        )

    # per sample: PIL resize (+ resized crop, flip) to uint8 tensors; per batch: float and normalization (FolderBatches)
    resize = v2.Resize((image_size, image_size), interpolation=INTERPOLATION)
    crop = (
        [v2.RandomResizedCrop(image_size, scale=augment.resized_crop_scale, ratio=RATIO, interpolation=INTERPOLATION)]
        if resized_crop_scale
        else []
    )
    train_tf = v2.Compose([resize, *crop, *([v2.RandomHorizontalFlip()] if hflip else []), v2.PILToTensor()])
    eval_tf = v2.Compose([resize, v2.PILToTensor()])
    folders = {}
    for split, items in samples.items():  # torchvision's ImageFolder over the split's folder, restricted to its files
        folder = _Folder(Path(items[0][0]).parent.parent, classes, {p for p, _ in items}, eval_tf)
        position = {p: i for i, (p, _) in enumerate(folder.samples)}
        folders[split] = folder.subset([position[p] for p, _ in items], train_tf if split == "train" else eval_tf)

    train_targets = torch.as_tensor(folders["train"].targets, dtype=torch.long)
    class_weights, sample_weights = balance_weights(balance, train_targets, len(classes))
    counts = {s: np.bincount(f.targets, minlength=len(classes)).tolist() for s, f in folders.items()}
    log.info(
        "%s: %s, decoded with PIL every epoch by %d loader workers, pin_memory=%s, balance=%s%s",
        name,
        layout.describe(val_from_train, test_fraction, seed),
        workers,
        pin,
        balance,
        f" (class weights {[round(w, 3) for w in class_weights]})" if class_weights else "",
    )
    return DataBundle(
        train=FolderBatches(folders["train"], batch_size, True, seed, workers, pin, mean, std, sample_weights),
        val=FolderBatches(folders["val"], eval_batch_size, False, seed, workers, pin, mean, std),
        test=FolderBatches(folders["test"], eval_batch_size, False, seed, workers, pin, mean, std),
        num_classes=len(classes),
        class_names=list(classes),
        image_size=image_size,
        in_channels=3,
        name=name,
        class_counts={s: counts[s] for s in SPLITS},
        class_weights=class_weights,
        fingerprint=fingerprint(files),
    )


def _store_bundle(
    store: Store,
    files: list[str],
    samples: dict,
    classes: list[str],
    layout: str,
    augment: Augment,
    batch_size: int,
    eval_batch_size: int,
    mean,
    std,
    balance: str,
    seed: int,
    name: str,
) -> DataBundle:
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
        batch_size,
        eval_batch_size,
        augment,
        seed,
        name,
        list(mean),
        list(std),
        balance,
        channels=3,
        fingerprint=store.fingerprint,
    )
    log.info(
        "%s: %s, from the decoded-image store (%d channel%s), balance=%s%s",
        name,
        layout,
        store.images.shape[1],
        "" if store.images.shape[1] == 1 else "s",
        balance,
        f" (class weights {[round(w, 3) for w in data.class_weights]})" if data.class_weights else "",
    )
    return data


def chest_xray(
    root: str = "data/chest_xray", val_from_train: float | None = 0.1, name: str = "chest_xray", **kwargs
) -> DataBundle:
    """Kaggle's "Chest X-Ray Images (Pneumonia)": ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``."""
    kwargs.setdefault(
        "source",
        'Kaggle "Chest X-Ray Images (Pneumonia)" (kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia); unzip it and point dataset.root at its chest_xray/ folder',
    )
    kwargs.setdefault("classes_hint", ["NORMAL", "PNEUMONIA"])
    return imagefolder(root=root, val_from_train=val_from_train, name=name, **kwargs)


class Layout:
    """Where the splits of ``root`` are, and the errors that show the expected tree."""

    def __init__(
        self, root: str | None, source: str | None, classes_hint: Sequence[str] | None, val_from_train: float | None
    ):
        self.source = source or "your own images: one sub-folder per class"
        self.classes_hint = list(classes_hint or ["<class_a>", "<class_b>"])
        self.display = root
        if root is None:
            self.fail("dataset=imagefolder needs dataset.root=PATH")
        self.root = Path(str(root)).expanduser()
        if not self.root.is_dir():
            self.fail(f"no such folder ({self.root.resolve()})")
        self.single = not (self.root / "train").is_dir()
        nested = [d.name for d in sorted(self.root.iterdir()) if (d / "train").is_dir()] if self.single else []
        if nested:  # e.g. the zip's outer folder: ROOT/chest_xray/train/...
            self.fail(
                f"no train/ folder here, but {self.display}/{nested[0]}/train/ exists: use dataset.root={self.display}/{nested[0]}"
            )
        if self.single:
            self.splits = ["all"]
        else:
            self.splits = ["train", "test"] + (["val"] if val_from_train is None else [])
            for split in self.splits:
                if not (self.root / split).is_dir():
                    hint = "; or set dataset.val_from_train=0.1 to carve val from train" if split == "val" else ""
                    self.fail(f"the {split}/ split is missing{hint}")

    def tree(self) -> str:
        classes = ",".join(self.classes_hint)
        lines = [f"  {self.display}/"] + [f"    {s}/{{{classes}}}/*.jpeg" for s in SPLITS]
        return "\n".join(lines)

    def fail(self, problem: str):
        raise ConfigError(
            "root",
            self.display,
            f"{problem}. Expected:\n{self.tree()}\n"
            f"(or a single folder of class sub-folders, split by dataset.test_fraction and dataset.val_from_train)\n"
            f"Data: {self.source}",
        )

    def folder(self, split: str) -> Path:
        return self.root if split == "all" else self.root / split

    def scan(self, split: str) -> tuple[list[str], list[tuple[str, int]]]:
        """Class folders (sorted, hidden ones ignored) and image files of one split folder."""
        folder = self.folder(split)
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith((".", "__")))
        if not classes:
            self.fail(f"{folder} has no class folders")
        items, ignored = [], 0
        for index, cls in enumerate(classes):
            found = 0
            for entry in sorted(os.scandir(folder / cls), key=lambda e: e.name):
                if (
                    entry.is_file()
                    and not entry.name.startswith(".")
                    and entry.name.lower().endswith(datasets.folder.IMG_EXTENSIONS)
                ):
                    items.append((entry.path, index))
                    found += 1
                else:
                    ignored += 1
            if found == 0:
                raise ConfigError(
                    "root",
                    self.display,
                    f"class folder {folder / cls} is empty (no {'/'.join(datasets.folder.IMG_EXTENSIONS)} files);"
                    " add images or remove that class folder from every split",
                )
        if ignored:
            log.info(
                "%s: ignored %d entries that are not image files (hidden files, other extensions, sub-folders)",
                folder,
                ignored,
            )
        return classes, items

    def describe(self, val_from_train: float | None, test_fraction: float, seed: int) -> str:
        if self.single:
            return f"single folder {self.display}, split by test_fraction={test_fraction}, val_from_train={val_from_train} (stratified, seed {seed})"
        if val_from_train is None:
            return f"splits train/val/test from {self.display}"
        unused = f"; {self.root / 'val'}/ is not used" if (self.root / "val").is_dir() else ""
        return f"splits train/test from {self.display}, val = {val_from_train:.0%} of train (stratified, seed {seed}){unused}"


def _carve_splits(samples: dict, layout: Layout, val_from_train: float | None, test_fraction: float, seed: int) -> dict:
    """train/val/test sample lists: carve test (single folder) and val (``val_from_train``) stratified."""

    def split(items, fraction, key):
        targets = np.array([t for _, t in items])
        try:
            take, rest = stratified_split(targets, [fraction], seed)
        except ValueError as exc:  # too few images per class for a stratified split
            raise ConfigError(
                key, fraction, f"cannot split {len(items)} images of {len(set(targets))} classes stratified ({exc})"
            ) from None
        return [items[i] for i in rest], [items[i] for i in take]

    if layout.single:
        if not 0 < test_fraction < 1:
            raise ConfigError(
                "test_fraction", test_fraction, "a single folder needs a test fraction in (0, 1), e.g. 0.2"
            )
        if val_from_train is None:
            raise ConfigError(
                "val_from_train", None, "a single folder (no train/ sub-folder) needs a validation fraction, e.g. 0.1"
            )
        samples = dict(zip(("train", "test"), split(samples["all"], test_fraction, "test_fraction")))
    if val_from_train is not None:
        samples["train"], samples["val"] = split(samples["train"], val_from_train, "val_from_train")
    return {s: samples[s] for s in SPLITS}


def _drop_bad_images(samples: dict, on_bad_image: str, layout: Layout) -> dict:
    """Check every file with PIL's ``verify()``; skip (with one warning) or fail on the bad ones."""
    from PIL import Image

    start, bad = time.perf_counter(), {}
    for items in samples.values():
        for path, _ in items:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as exc:  # UnidentifiedImageError, truncated or corrupt data, unreadable file
                bad[path] = f"{type(exc).__name__}: {exc}"
    n = sum(map(len, samples.values()))
    log.info("checked %d image files in %.1fs: %d unreadable", n, time.perf_counter() - start, len(bad))
    if not bad:
        return samples
    listed = "; ".join(f"{os.path.relpath(p, layout.root)} ({why})" for p, why in list(bad.items())[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    if on_bad_image == "error":
        raise ConfigError(
            "on_bad_image",
            "error",
            f"{len(bad)} unreadable image file(s) in {layout.display}: {listed}{more}; "
            "remove or replace them, or set dataset.on_bad_image=skip to skip them with a warning",
        )
    log.warning("skipped %d unreadable image file(s) in %s: %s%s", len(bad), layout.display, listed, more)
    return {s: [(p, t) for p, t in items if p not in bad] for s, items in samples.items()}
