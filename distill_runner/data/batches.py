"""What every loader of a :class:`~distill_runner.data.bundle.DataBundle` offers: the :class:`Batches` protocol.

The runner, the training loop, teacher-output replay and the benchmarks use exactly these members, on
every loader alike (:class:`~distill_runner.data.bundle.TensorBatches` over a tensor or the decoded-image
store, :class:`~distill_runner.data.folder_batches.FolderBatches` decoding with PIL); a new loader
implements all of them (``tests/unit/data/test_loaders.py`` checks the shipped ones), so no caller has to ask
what a loader can do.

Docs: docs/reference/api.md
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Batches(Protocol):
    """Batches of ``{"image": float [B,C,H,W], "target": long [B], "index": long [B]}`` (``index``:
    the sample's position in its split), one epoch per iteration; plus ``"image_strong"`` after
    :meth:`set_strong` (terms with ``views = ("weak", "strong")``)."""

    batch_size: int  # images per batch (the epoch's last batch may hold fewer)
    replayable: bool  # an epoch's batches repeat exactly (set_epoch): teacher outputs can be replayed
    holds_images: bool  # the images are one uint8 tensor, which place() can move to a device as a whole

    def set_epoch(self, epoch: int) -> None:
        """The order and augmentation of the next iteration: those of ``epoch`` (call before each)."""

    def set_strong(self, strong) -> None:
        """From now on, batches also carry ``image_strong``: each image's strong view under ``strong`` (a
        :class:`~distill_runner.data.strong_augment.StrongAugment`, from (seed, epoch) too); None: they do not."""

    def shard(self, rank: int, world_size: int, pad: bool = True) -> None:
        """Yield only this process's part of every epoch (DDP)."""

    @property
    def num_samples(self) -> int:
        """Images in the split (all processes together)."""

    @property
    def nbytes(self) -> int:
        """Bytes the split's images take as uint8 at the model's input size."""

    @property
    def distinct_epochs(self) -> int | None:
        """How many epochs differ in their images: 1 without random augmentation, else None."""

    def place(self, device: torch.device | str, resident: bool) -> Batches:
        """Yield batches for ``device``; ``resident``: hold the whole split there (only when ``holds_images``)."""

    def __len__(self) -> int:
        """Batches per epoch (this process's part)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """This process's batches of one epoch, in the order and augmentation :meth:`set_epoch` chose."""
