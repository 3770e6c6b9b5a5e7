"""scikit-learn's handwritten digits: 1,797 real 8x8 images of 10 classes, shipped with the package.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distill_runner.data.augment import Augment
from distill_runner.data.bundle import DataBundle, in_memory_bundle, stratified_split
from distill_runner.errors import ConfigError


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
    """Upsampled to ``image_size`` and made 3-channel; seeded stratified train/val/test.

    ``limit`` keeps only the first N images of each split (for smoke tests)."""
    from sklearn.datasets import load_digits

    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            "val_fraction", val_fraction, f"val_fraction + test_fraction must be < 1 (test_fraction={test_fraction})"
        )
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
        limited=limit is not None,
    )
