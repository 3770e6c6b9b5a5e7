"""The on-the-fly loader of an ImageFolder split (``data.decode_cache=false``, or no room for the store).

torchvision's ``ImageFolder`` over the scanned files, PIL decoding in ``DataLoader`` workers. The
sampler draws the order and one augmentation seed per sample from (seed, epoch), so an epoch's batches
and augmentations are the same whatever the number of workers (:meth:`FolderBatches.set_epoch`); they
are not replayed as a batch (``replayable`` is False: the teacher runs online). :class:`FolderBatches`
implements the whole :class:`~distill_runner.data.batches.Batches` protocol, as the store's
:class:`~distill_runner.data.bundle.TensorBatches` does.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets

from distill_runner.data.bundle import shard_order, shard_size
from distill_runner.data.images import load_rgb
from distill_runner.data.strong_augment import STRONG_STREAM, StrongAugment
from distill_runner.errors import BadImageError

log = logging.getLogger(__name__)


class Folder(datasets.ImageFolder):
    """torchvision's ImageFolder over a checked file list, yielding the runner's batch dicts.

    ``dataset[(i, aug_seed)]`` applies the transform with the torch RNG seeded by ``aug_seed``
    (random transforms become reproducible per sample and epoch); ``dataset[i]`` uses seed 0.
    """

    strong: StrongAugment | None = None  # set: items also hold "image_strong" (FolderBatches.set_strong)

    def __init__(self, root: Path, classes: list[str], files: set[str], transform):
        self._classes = classes
        super().__init__(
            str(root), transform=transform, loader=load_rgb, is_valid_file=files.__contains__, allow_empty=True
        )

    def find_classes(self, directory):  # the scanned class folders (no hidden folders)
        return self._classes, {c: i for i, c in enumerate(self._classes)}

    def __getitem__(self, item) -> dict:
        index, aug_seed = item if isinstance(item, tuple) else (item, 0)
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as exc:  # only if a file changed after the up-front decode check
            raise BadImageError(
                f"{path} could not be decoded ({type(exc).__name__}: {exc}); remove or replace the file"
            ) from None
        item = {"image": self._transformed(image, aug_seed), "target": target, "index": index}
        if self.strong is not None:  # the transform again with a seed of its own, then the strong ops
            strong_seed = (aug_seed + STRONG_STREAM) % 2**63
            base = self._transformed(image, strong_seed)
            item["image_strong"] = self.strong(base[None], torch.Generator().manual_seed(strong_seed))[0]
        return item

    def _transformed(self, image, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def subset(self, positions: Sequence[int], transform) -> Folder:
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
        dataset: Folder,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int,
        pin_memory: bool,
        mean: Sequence[float],
        std: Sequence[float],
        sample_weights: torch.Tensor | None = None,
        image_size: int = 224,
        random_augment: bool = False,
    ):
        self.dataset, self.batch_size, self.image_size = dataset, batch_size, image_size
        self.random_augment = random_augment
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.sampler = _EpochSampler(len(dataset), shuffle, seed, sample_weights)
        self.pin_memory, self.num_workers = pin_memory, num_workers
        self.loader = self._data_loader()

    def _data_loader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset, self.batch_size, sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0
        )

    replayable = False  # decoded and augmented per sample by workers: the teacher runs online
    holds_images = False  # decoded on the fly: nothing to hold on a device

    @property
    def targets(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.targets, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def set_strong(self, strong: StrongAugment | None) -> None:
        """Items also hold ``image_strong`` (or not): a new DataLoader, whose workers see the change."""
        if strong != self.dataset.strong:
            self.dataset.strong = strong
            self.loader = self._data_loader()

    def shard(self, rank: int, world_size: int, pad: bool = True) -> None:
        """Load only this process's part of every epoch (DDP; see :func:`data.shard_order`)."""
        self.sampler.rank, self.sampler.world_size, self.sampler.pad = rank, world_size, pad

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        """Bytes of this split's images as 3-channel uint8 at ``image_size`` (what a tensor of them would take)."""
        return self.num_samples * 3 * self.image_size**2

    @property
    def distinct_epochs(self) -> int | None:
        """1 without random augmentation (only the order changes between epochs), else None."""
        return None if self.random_augment or self.dataset.strong is not None else 1

    def place(self, device: torch.device | str, resident: bool) -> FolderBatches:
        """Batches stay on the host (the training loop copies each; pinned when ``pin_memory``): images
        decoded on the fly cannot be held on ``device`` as one tensor, so ``resident`` is refused."""
        if resident:
            raise ValueError("FolderBatches decodes on the fly: it cannot hold the images on a device")
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            for view in ("image", "image_strong") if "image_strong" in batch else ("image",):
                batch[view] = (batch[view].float() - self.mean) / self.std
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
