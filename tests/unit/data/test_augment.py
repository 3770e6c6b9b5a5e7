"""Tensor augmentation: reproducible from (seed, epoch), within its documented ranges, and the
same batches whether the training set is resident on the device or gathered per batch."""

import math

import numpy as np
import pytest
import torch

from distill_runner.data.augment import RATIO, Augment
from distill_runner.data.bundle import TensorBatches, in_memory_bundle
from distill_runner.data.digits import digits


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp(b=64, h=48, w=64, axis=3):
    """uint8 images whose value is 4 x the column (axis=3) or row (axis=2) index."""
    size = w if axis == 3 else h
    line = torch.arange(size, dtype=torch.uint8) * 4
    shape = [1, 1, 1, 1]
    shape[axis] = size
    return line.view(shape).expand(b, 1, h, w).contiguous()


def test_resized_crop_boxes_match_the_documented_ranges():
    aug = Augment(resized_crop_scale=(0.3, 0.9))
    h, w = 60, 80
    top, left, ch, cw = aug.crop_boxes(4000, h, w, gen())
    area = (ch * cw).double() / (h * w)
    ratio = cw.double() / ch.double()
    # whole pixels: the area and ratio ranges hold up to the rounding of width and height
    slack_area = (ch + cw + 1).double() / (h * w)
    assert ((area >= 0.3 - slack_area) & (area <= 0.9 + slack_area)).all()
    assert (
        (ratio >= RATIO[0] * (1 - 1 / ch.double()) - 1e-9) & (ratio <= RATIO[1] * (1 + 1 / ch.double()) + 1e-9)
    ).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    # the spread is that of torchvision's RandomResizedCrop (the same distribution, drawn batched)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.empty(1, h, w), [0.3, 0.9], list(RATIO)) for _ in range(4000)])
    assert area.mean().item() == pytest.approx((tv[:, 2] * tv[:, 3] / (h * w)).mean(), abs=0.01)
    assert ratio.log().mean().item() == pytest.approx(np.log(tv[:, 3] / tv[:, 2]).mean(), abs=0.02)
    assert ((top.double() + 0.5) / (h - ch + 1).double()).mean().item() == pytest.approx(
        0.5, abs=0.02
    )  # uniform position


def test_resized_crop_falls_back_to_the_largest_centered_crop():
    aug = Augment(resized_crop_scale=(1.0, 1.0))  # a 16x32 image has no full-area crop with ratio in [3/4, 4/3]
    top, left, ch, cw = aug.crop_boxes(5, 16, 32, gen())
    assert ch.tolist() == [16] * 5 and cw.tolist() == [round(16 * 4 / 3)] * 5
    assert top.tolist() == [0] * 5 and left.tolist() == [(32 - 21) // 2] * 5


@pytest.mark.parametrize("axis", [3, 2])
def test_resized_crop_samples_its_box_and_flips_exactly_where_drawn(axis):
    images = ramp(axis=axis)
    aug = Augment(hflip=True, resized_crop_scale=(0.5, 1.0))
    out = aug(images, gen(3))
    g = gen(3)  # the same draws, in the same order: boxes, then flips
    top, left, ch, cw = aug.crop_boxes(len(images), 48, 64, g)
    flip = torch.rand(len(images), generator=g) < 0.5
    assert out.dtype == torch.float32 and out.shape == images.shape and 10 < flip.sum() < 54
    # bilinear sampling of a linear ramp is exact: output pixel k shows the box's position k
    k = torch.arange(64 if axis == 3 else 48, dtype=torch.float64)
    start, length, size = (left, cw, 64) if axis == 3 else (top, ch, 48)
    expected = (start[:, None] + (k + 0.5) * length[:, None] / size - 0.5).clamp(0, size - 1) * 4
    if axis == 3:
        expected = torch.where(flip[:, None], expected.flip(1), expected)
        got = out[:, 0, 0, :]
    else:  # a vertical flip never happens: rows stay in order
        got = out[:, 0, :, 0]
    assert torch.allclose(got.double(), expected, atol=2e-3)


def test_flip_is_an_exact_mirror_and_identity_crop_changes_nothing():
    images = torch.randint(0, 256, (32, 3, 8, 10), dtype=torch.uint8, generator=gen(1))
    out = Augment(hflip=True)(images, gen(5))
    flipped = torch.rand(32, generator=gen(5)) < 0.5
    assert torch.equal(out[flipped], images[flipped].flip(3)) and torch.equal(out[~flipped], images[~flipped])
    whole = Augment(hflip=True, resized_crop_scale=(1.0, 1.0), resized_crop_ratio=(1.25, 1.25))  # 10/8: the whole image
    out = whole(images, gen(5))
    g = gen(5)
    assert [t.tolist() for t in whole.crop_boxes(32, 8, 10, g)] == [[0] * 32, [0] * 32, [8] * 32, [10] * 32]
    flipped = torch.rand(32, generator=g) < 0.5
    expected = torch.where(flipped[:, None, None, None], images.flip(3), images).float()
    assert torch.allclose(out, expected, atol=1e-3)  # exact up to float rounding of the sample positions


def test_augmented_epochs_replay_from_seed_and_epoch():
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8, generator=gen(2))
    make = lambda: TensorBatches(
        images,
        torch.arange(40) % 2,
        8,
        [0.5] * 3,
        [0.25] * 3,
        shuffle=True,
        seed=7,
        channels=3,
        augment=Augment(crop_padding=2, hflip=True, resized_crop_scale=(0.6, 1.0)),
    )

    def epoch(loader, e):
        loader.set_epoch(e)
        return [(b["index"], b["image"]) for b in loader]

    a, b = make(), make()
    e0, again, other = epoch(a, 0), epoch(b, 0), epoch(a, 1)
    assert all(torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(e0, again))
    assert not all(torch.equal(x, y) for (_, x), (_, y) in zip(e0, other))
    assert e0[0][1].shape == (8, 3, 16, 16) and a.distinct_epochs is None


def test_grayscale_images_are_normalized_into_the_models_channels():
    images = torch.full((4, 1, 6, 6), 128, dtype=torch.uint8)
    batch = next(
        iter(
            TensorBatches(
                images, torch.zeros(4, dtype=torch.long), 4, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], channels=3
            )
        )
    )
    assert batch["image"].shape == (4, 3, 6, 6)
    for c, (m, s) in enumerate(zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])):
        assert torch.allclose(batch["image"][:, c], torch.tensor((128 / 255 - m) / s), atol=1e-5)


def test_resident_and_streamed_training_sets_give_the_same_batches():
    def epochs(resident):
        data = digits(image_size=16, batch_size=32, limit=128, crop_padding=2, hflip=True)
        data.train.augment.resized_crop_scale = (0.7, 1.0)
        data.place("cpu", resident)
        assert (data.train.rows is None) == resident  # resident: the split's own contiguous tensor
        out = []
        for e in (0, 1):
            data.train.set_epoch(e)
            out += [b["image"] for b in data.train]
        return out

    assert all(torch.equal(x, y) for x, y in zip(epochs(True), epochs(False)))


def test_in_memory_splits_index_one_tensor_without_copies():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    splits = {"train": np.arange(6), "val": np.array([6, 7]), "test": np.array([8, 9])}
    data = in_memory_bundle(
        images, torch.arange(10) % 2, splits, ["a", "b"], 4, 4, None, 0, "toy", [0.0] * 3, [1 / 255] * 3
    )
    assert data.test.images is images and data.val.images is images
    assert next(iter(data.test))["image"][:, 0, 0, 0].tolist() == [8.0, 9.0]
    assert data.train.nbytes == 6 * 12 and math.isclose(data.val.nbytes, 24)
