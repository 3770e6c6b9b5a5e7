"""Data sets and loaders.

A data set factory (named by ``dataset._target_``) returns a :class:`DataBundle`: train/val/test
loaders that yield ``{"image": float tensor [B,C,H,W], "target": long tensor [B], "index": long
tensor [B]}`` batches (``index``: the sample's position in its split), plus what the models need to
know (class count, image size, channels) and the class-imbalance handling (``class_weights``).

Factories: :func:`digits` (here), :mod:`distill_runner.data.cifar` (CIFAR-10/100, in memory) and
:mod:`distill_runner.data.imagefolder` (chest X-ray and any ImageFolder: decoded once into a
memory-mapped uint8 store, :mod:`distill_runner.data.decode_cache`, or by DataLoader workers).

Images held as one uint8 tensor (in memory or memory-mapped) are batched by indexing
(:class:`TensorBatches`); augmentation (:mod:`distill_runner.data.augment`) runs on whole batches as
tensor ops with parameters drawn from (seed, epoch), so an epoch's batches are reproducible. The
runner then places the training set (:meth:`DataBundle.place`, ``data.on_device``): the whole set
on the training device, or batches copied there one by one.

Docs: docs/reference/api.md
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from distill_runner.data.augment import Augment
from distill_runner.data.batches import Batches
from distill_runner.data.strong_augment import StrongAugment, strong_generator
from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)


GPU_SHARE = 0.25  # data.on_device=auto: the training set may take this share of the free GPU memory


@dataclass
class DataBundle:
    """Every loader is a :class:`~distill_runner.data.batches.Batches` (``set_epoch``, ``shard``,
    ``num_samples``, ``place``, ...). ``class_weights`` (one per class) is set when ``balance=class_weights``:
    the runner passes it to every cross-entropy term. ``fingerprint`` is the digest of the data's
    print (:class:`~distill_runner.data.prints.DataPrint`: each file's content hash, label and split)
    that every data-derived cache key holds; None when the config alone determines the data."""

    train: Batches
    val: Batches
    test: Batches
    num_classes: int
    class_names: list[str]
    image_size: int
    in_channels: int = 3
    name: str = "dataset"
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    class_weights: list[float] | None = None
    fingerprint: str | None = None

    def place(self, device: torch.device | str, on_device: bool | str = "auto") -> None:
        """Serve the training batches on ``device`` (:meth:`TensorBatches.place`); val/test stay on
        the host (evaluation moves each batch). ``on_device``: true = the whole training set as one
        tensor on the device; false = each batch gathered on the host and copied; auto = true on
        CUDA when the set takes at most a quarter of the free GPU memory, false on a CPU, where the
        images already are in host memory (a memory-mapped store's pages are shared by the OS
        between the parallel jobs of a sweep; a private copy would only add memory). Loaders that
        decode on the fly (``dataset.decode_cache=false``) are left as they are. The schema checked
        ``on_device`` (``data.on_device``)."""
        device = torch.device(device)
        if not self.train.holds_images:
            if on_device is True:
                log.info("data.on_device=true ignored: %s is decoded on the fly, not held as a tensor", self.name)
            self.train.place(device, resident=False)
            return
        nbytes = self.train.nbytes
        if on_device != "auto":
            resident, why = on_device, f"data.on_device={str(on_device).lower()}"
        elif device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            resident = nbytes <= GPU_SHARE * free
            share = f"{GPU_SHARE:.0%} of the {free / 2**30:.1f} GiB free"
            why = f"data.on_device=auto: {nbytes / 2**20:.0f} MB {'<=' if resident else '>'} {share}"
        else:
            resident, why = False, "data.on_device=auto: on a CPU they stay where they are"
        self.train.place(device, resident)
        where = (
            f"held on {device} as one tensor"
            if resident
            else "in host memory" + (f", each batch copied to {device}" if device.type != "cpu" else "")
        )
        log.info(
            "training images (%d, %.0f MB): %s; batches by indexing, no loader workers (%s)",
            self.train.num_samples,
            nbytes / 2**20,
            where,
            why,
        )


class TensorBatches:
    """Batches from one uint8 image tensor: shuffled and augmented per (seed, epoch).
    With ``sample_weights`` (one per image) the epoch's images are drawn with replacement.

    ``images`` may hold more than this split (a memory-mapped store of every split): ``rows``
    then says which row holds the split's image i. 1-channel (grayscale) images become
    ``channels`` channels in the normalization step, after augmentation (3x less work).

    Call :meth:`set_epoch` before iterating (like ``DistributedSampler``) to get that epoch's
    order and augmentation; iterating again without it repeats the same epoch. Because an epoch
    replays exactly, a frozen teacher's outputs can be computed once and replayed
    (``replayable``); batches carry each image's ``index`` for that.
    """

    replayable = True
    holds_images = True

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
        rows: torch.Tensor | None = None,
        channels: int | None = None,
    ):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 [N,C,H,W]"
        self.images, self.targets, self.sample_weights = images, targets, sample_weights
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.epoch, self.drop_last = seed, 0, drop_last
        channels = channels or images.shape[1]
        self.mean, self.std = (_per_channel(v, channels) * 255 for v in (mean, std))
        self.device = images.device
        self.rank, self.world_size, self.pad = 0, 1, True
        self.strong: StrongAugment | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_strong(self, strong: StrongAugment | None) -> None:
        """Add ``batch["image_strong"]`` (:mod:`distill_runner.data.strong_augment`), or None: not."""
        self.strong = strong

    def shard(self, rank: int, world_size: int, pad: bool = True) -> None:
        """Yield only this process's part of every epoch (see :func:`shard_order`)."""
        self.rank, self.world_size, self.pad = rank, world_size, pad

    @property
    def num_samples(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of this split's images (uint8)."""
        return self.num_samples * self.images[:1].numel()

    @property
    def distinct_epochs(self) -> int | None:
        """How many epochs differ in their images: 1 without random augmentation (only the order
        changes), else None (every epoch draws new augmentation)."""
        return 1 if (self.augment is None or self.augment.is_identity) and self.strong is None else None

    def place(self, device: torch.device | str, resident: bool) -> TensorBatches:
        """Yield batches on ``device``. ``resident``: this split's images move there once, as one
        tensor (on a CPU: copied out of a memory map into process memory), and batches are indexed
        there. Else they stay where they are (host memory or a memory map): each batch is gathered
        there and copied (on CUDA from pinned memory, asynchronously). Augmentation and
        normalization run on ``device`` either way, from the same draws: the batches are equal."""
        self.device = torch.device(device)
        if resident:  # a private copy: gathered from the shared rows, or copied as a whole
            images = self.images if self.rows is None else self.images[self.rows]
            self.images, self.rows = images.to(self.device, copy=self.rows is None), None
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

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
        strong_gen = strong_generator(self.seed, self.epoch) if self.strong is not None else None
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.batch(index, gen, strong_gen)

    def batch(
        self, index: torch.Tensor, gen: torch.Generator, strong_gen: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The images at ``index`` (positions in this split), augmented with ``gen``'s next draws,
        normalized, on ``self.device``; with ``strong_gen`` also their strong view (its own draws)."""
        raw = images = self.gather(index)
        if self.augment is not None:
            images = self.augment(images, gen)
        out = {
            "image": (images.float() - self.mean) / self.std,  # [B,1,H,W] broadcasts to the model's channels
            "target": self.targets[index].to(self.device, non_blocking=True),
            "index": index.to(self.device, non_blocking=True),
        }
        if strong_gen is not None:
            out["image_strong"] = (self.strong(raw, strong_gen, self.augment).float() - self.mean) / self.std
        return out

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images at ``index``, indexed where they are held, then on ``self.device``."""
        rows = index if self.rows is None else self.rows[index]
        images = self.images[rows.to(self.images.device)]
        if images.device != self.device:
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
        return images


def _per_channel(values: Sequence[float], channels: int) -> torch.Tensor:
    """[1, channels, 1, 1] float tensor of per-channel statistics (one value serves every channel)."""
    t = torch.as_tensor(list(values), dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ConfigError("mean", list(values), f"give one value per channel ({channels}) or one for all")
    return t.reshape(1, channels, 1, 1).clone()


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


def balance_weights(
    balance: str, train_targets: torch.Tensor, num_classes: int
) -> tuple[list[float] | None, torch.Tensor | None]:
    """``(class_weights, sample_weights)`` for ``balance``: ``class_weights`` = N / (K * n_c) (mean
    1 over the training images) for the cross-entropy terms; ``sample_weights`` = 1 / n_c per
    training image, so a weighted sampler draws every class equally often. One of them or neither
    (``balance`` is one of :data:`distill_runner.spec.BALANCE`: the schema checked it)."""
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


def check_classes(
    class_counts: dict[str, Sequence[int]],
    class_names: Sequence[str],
    key: str = "root",
    value: object = None,
    fix: str | Callable[[str, str], str] = "add images of that class",
    limited: bool = False,
) -> None:
    """Refuse, before any model is built, a data set that cannot be trained and scored: fewer than
    two classes, or a split with no image of some class (its recall and the macro averages would
    be NaN, after a whole training run). ``key``/``value``/``fix`` word the error (e.g.
    ``root``, the folder, and what to add there; or ``fix(split, class)``, a fix naming them).
    ``limited`` (``dataset.limit``, a smoke test's deliberate subset): a class missing from a split
    is only a warning."""
    if len(class_names) < 2:
        raise ConfigError(
            key,
            value,
            f"the data set has a single class ({', '.join(class_names) or 'none'}): classification needs "
            "at least two; add a folder of images for every class",
        )
    for split, counts in class_counts.items():
        missing = [name for name, n in zip(class_names, counts) if n == 0]
        if not missing:
            continue
        if limited:
            log.warning(
                "dataset.limit leaves class(es) %s out of the %s split: their metrics are undefined", missing, split
            )
            continue
        others = f" (and {len(missing) - 1} more class(es): {', '.join(missing[1:6])})" if len(missing) > 1 else ""
        todo = fix(split, missing[0]) if callable(fix) else fix
        raise ConfigError(key, value, f"the {split} split has no images of class {missing[0]}{others}; {todo}")


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
    channels: int | None = None,
    fingerprint: str | None = None,
    limited: bool = False,
) -> DataBundle:
    """Loaders over one uint8 tensor (every split; each loader indexes its own rows, nothing is
    copied); normalization statistics from the training split unless given; ``balance`` (none |
    weighted_sampler | class_weights) as in :func:`balance_weights`. ``channels``: what the model
    sees (1-channel images are broadcast to it when normalized); ``fingerprint``: see
    :class:`DataBundle`. Refuses a split without some class (:func:`check_classes`; ``limited``:
    a ``dataset.limit`` subset, where that is only a warning)."""
    if mean is None or std is None:
        mean, std = _statistics(images[torch.as_tensor(splits["train"])])
    num_classes = len(class_names)
    class_weights, sample_weights = balance_weights(balance, targets[torch.as_tensor(splits["train"])], num_classes)
    loader = partial(_split_loader, images, targets, splits, mean=mean, std=std, seed=seed, channels=channels)
    counts = {s: _counts(targets[torch.as_tensor(i, dtype=torch.long)], num_classes) for s, i in splits.items()}
    check_classes(counts, class_names, limited=limited)
    return DataBundle(
        train=loader("train", batch_size, augment=augment, sample_weights=sample_weights),
        val=loader("val", eval_batch_size),
        test=loader("test", eval_batch_size),
        num_classes=num_classes,
        class_names=class_names,
        image_size=images.shape[-1],
        in_channels=channels or images.shape[1],
        name=name,
        class_counts=counts,
        class_weights=class_weights,
        fingerprint=fingerprint,
    )


def _split_loader(images: torch.Tensor, targets: torch.Tensor, splits: dict[str, np.ndarray], split: str,
                  batch_size: int, mean, std, seed: int, channels: int | None, augment: Augment | None = None,
                  sample_weights: torch.Tensor | None = None) -> TensorBatches:  # fmt: skip
    """The batches of one split over the shared image tensor (its rows indexed, nothing copied): the training
    split shuffled, augmented and weighted; val and test in order, as they are."""
    idx = torch.as_tensor(splits[split], dtype=torch.long)
    return TensorBatches(
        images,
        targets[idx],
        batch_size,
        mean,
        std,
        shuffle=split == "train",
        augment=augment,
        seed=seed,
        sample_weights=sample_weights,
        rows=idx,
        channels=channels,
    )


def _statistics(train: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of uint8 training images, in [0, 1] units."""
    pixels = train.float().div(255).transpose(0, 1).reshape(train.shape[1], -1)
    return pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()


def _counts(targets: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(targets, minlength=num_classes).tolist()
