"""Data sets and loaders.

A data set factory (named by ``dataset._target_``) returns a :class:`DataBundle`: train/val/test
loaders that yield ``{"image": float tensor [B,C,H,W], "target": long tensor [B], "index": long
tensor [B]}`` batches (``index``: the sample's position in its split), plus what the models need to
know (class count, image size, channels) and the class-imbalance handling (``class_weights``).

Factories: :func:`digits` (here), :mod:`distill_runner.cifar` (CIFAR-10/100, in memory) and
:mod:`distill_runner.imagefolder` (chest X-ray and any ImageFolder, decoded by DataLoader workers).

Small data sets are held in memory as one uint8 tensor and batched by indexing
(:class:`TensorBatches`); augmentation runs on whole batches as tensor ops with parameters drawn
from (seed, epoch), so an epoch's batches are reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)


BALANCE = ("none", "weighted_sampler", "class_weights")


@dataclass
class DataBundle:
    """``train`` may have ``set_epoch(epoch)`` (called before each epoch); every loader has ``len()``
    and ``batch_size``. ``class_weights`` (one per class) is set when ``balance=class_weights``:
    the runner passes it to every cross-entropy term."""

    train: Iterable
    val: Iterable
    test: Iterable
    num_classes: int
    class_names: list[str]
    image_size: int
    in_channels: int = 3
    name: str = "dataset"
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    class_weights: list[float] | None = None


@dataclass
class Augment:
    """Batch augmentation on tensors: random translation by up to ``crop_padding`` pixels
    (zero-padded random crop) and random horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(images, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B,H,1]
            cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [B,1,W]
            images = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(b, generator=gen) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images


class TensorBatches:
    """Batches from an in-memory uint8 image tensor: shuffled and augmented per (seed, epoch).
    With ``sample_weights`` (one per image) the epoch's images are drawn with replacement.

    Call :meth:`set_epoch` before iterating (like ``DistributedSampler``) to get that epoch's
    order and augmentation; iterating again without it repeats the same epoch. Because an epoch
    replays exactly, a frozen teacher's outputs can be computed once and replayed
    (``replayable``); batches carry each image's ``index`` for that.
    """

    replayable = True

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        sample_weights: torch.Tensor | None = None,
    ):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 [N,C,H,W]"
        self.images, self.targets, self.sample_weights = images, targets, sample_weights
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.epoch, self.drop_last = seed, 0, drop_last
        self.rank, self.world_size, self.pad = 0, 1, True
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int, pad: bool = True) -> None:
        """Yield only this process's part of every epoch (see :func:`shard_order`)."""
        self.rank, self.world_size, self.pad = rank, world_size, pad

    @property
    def num_samples(self) -> int:
        return len(self.targets)

    @property
    def distinct_epochs(self) -> int | None:
        """How many epochs differ in their images: 1 without random augmentation (only the order
        changes), else None (every epoch draws new augmentation)."""
        identity = self.augment is None or (self.augment.crop_padding == 0 and not self.augment.hflip)
        return 1 if identity else None

    def __len__(self) -> int:
        n = shard_size(len(self.targets), self.rank, self.world_size, self.pad)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.targets)
        if self.sample_weights is not None:  # balance=weighted_sampler: draw with replacement
            order = torch.multinomial(self.sample_weights, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = shard_order(order, self.rank, self.world_size, self.pad)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[index]
            if self.augment is not None:
                images = self.augment(images, gen)
            yield {"image": (images.float() - self.mean) / self.std, "target": self.targets[index], "index": index}


def shard_order(order: torch.Tensor, rank: int, world_size: int, pad: bool = True) -> torch.Tensor:
    """This process's part of an epoch's ``order``, split as ``DistributedSampler`` splits it: every
    process computes the same order (same seed and epoch) and takes every ``world_size``-th sample.
    Training pads by wrapping around, so every process gets as many samples (and steps: DDP's
    collectives line up); evaluation does not (``pad=False``), so every sample counts once."""
    if world_size == 1:
        return order
    if pad:
        total = -(-len(order) // world_size) * world_size
        order = order[torch.arange(total) % len(order)]
    return order[rank::world_size]


def shard_size(n: int, rank: int, world_size: int, pad: bool = True) -> int:
    return -(-n // world_size) if pad else len(range(rank, n, world_size))


def stratified_split(targets: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of a seeded, stratified split of ``targets`` into len(fractions) + 1 parts:
    one part per fraction, the rest last."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(len(targets))
    parts, remaining = [], 1.0
    for frac in fractions:
        take, rest = train_test_split(rest, train_size=frac / remaining, stratify=targets[rest], random_state=seed)
        parts.append(np.sort(take))
        remaining -= frac
    return parts + [np.sort(rest)]


def balance_weights(balance: str, train_targets: torch.Tensor, num_classes: int) -> tuple[list[float] | None, torch.Tensor | None]:
    """``(class_weights, sample_weights)`` for ``balance``: ``class_weights`` = N / (K * n_c) (mean
    1 over the training images) for the cross-entropy terms; ``sample_weights`` = 1 / n_c per
    training image, so a weighted sampler draws every class equally often. One of them or neither."""
    if balance not in BALANCE:
        raise ConfigError("balance", balance, f"use one of {', '.join(BALANCE)}")
    counts = torch.bincount(train_targets, minlength=num_classes).double().clamp_min(1)
    if balance == "class_weights":
        return (len(train_targets) / (num_classes * counts)).tolist(), None
    if balance == "weighted_sampler":
        return None, (1.0 / counts)[train_targets]
    return None, None


def take_per_class(targets: np.ndarray, limit: int | None) -> np.ndarray:
    """Positions of the first ``limit`` samples taken round-robin over the classes (smoke tests:
    every class stays represented), in their original order."""
    targets = np.asarray(targets)
    if limit is None or limit >= len(targets):
        return np.arange(len(targets))
    rank = np.zeros(len(targets), dtype=np.int64)
    for c in np.unique(targets):
        rank[targets == c] = np.arange((targets == c).sum())
    return np.sort(np.lexsort((targets, rank))[:limit])


def check_choice(key: str, value: object, choices: Sequence) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"use one of {', '.join(map(str, choices))}")


def _check_fraction(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(key, value, "must be a fraction strictly between 0 and 1, e.g. 0.2")


def digits(
    image_size: int = 32,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    crop_padding: int = 0,
    hflip: bool = False,
    seed: int = 0,
    root: str | None = None,
    name: str = "digits",
) -> DataBundle:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes, shipped with the
    package): upsampled to ``image_size`` and made 3-channel; seeded stratified train/val/test.

    ``limit`` keeps only the first N images of each split (for smoke tests)."""
    from sklearn.datasets import load_digits

    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ConfigError("val_fraction", val_fraction, f"val_fraction + test_fraction must be < 1 (test_fraction={test_fraction})")
    raw = load_digits()
    pixels = torch.from_numpy(raw.images).float()[:, None] * (255.0 / 16.0)  # 0..16 -> 0..255
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = pixels.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    targets = np.asarray(raw.target)
    test_idx, val_idx, train_idx = stratified_split(targets, [test_fraction, val_fraction], seed)
    if limit is not None:
        train_idx, val_idx, test_idx = train_idx[:limit], val_idx[:limit], test_idx[:limit]
    return in_memory_bundle(
        images,
        torch.from_numpy(targets).long(),
        {"train": train_idx, "val": val_idx, "test": test_idx},
        class_names=[str(c) for c in raw.target_names],
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        augment=Augment(crop_padding, hflip),
        seed=seed,
        name=name,
    )


def in_memory_bundle(
    images: torch.Tensor,
    targets: torch.Tensor,
    splits: dict[str, np.ndarray],
    class_names: list[str],
    batch_size: int,
    eval_batch_size: int,
    augment: Augment | None,
    seed: int,
    name: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    balance: str = "none",
) -> DataBundle:
    """Loaders over one uint8 tensor; normalization statistics from the training split unless given;
    ``balance`` (none | weighted_sampler | class_weights) as in :func:`balance_weights`."""
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be a positive integer")
    train = images[torch.as_tensor(splits["train"])]
    if mean is None or std is None:
        pixels = train.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
        mean, std = pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()
    num_classes = len(class_names)
    class_weights, sample_weights = balance_weights(balance, targets[torch.as_tensor(splits["train"])], num_classes)

    def loader(split: str, train_mode: bool) -> TensorBatches:
        idx = torch.as_tensor(splits[split])
        return TensorBatches(
            images[idx],
            targets[idx],
            batch_size if train_mode else eval_batch_size,
            mean,
            std,
            shuffle=train_mode,
            augment=augment if train_mode else None,
            seed=seed,
            sample_weights=sample_weights if train_mode else None,
        )

    counts = {s: torch.bincount(targets[torch.as_tensor(i)], minlength=num_classes).tolist() for s, i in splits.items()}
    return DataBundle(
        train=loader("train", True),
        val=loader("val", False),
        test=loader("test", False),
        num_classes=num_classes,
        class_names=class_names,
        image_size=images.shape[-1],
        in_channels=images.shape[1],
        name=name,
        class_counts=counts,
        class_weights=class_weights,
    )
