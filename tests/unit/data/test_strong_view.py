"""The strong view (distill_runner.data.strong_augment): per sample, reproducible from (seed, epoch), new every
epoch; both loaders (the in-memory tensor and PIL with data.decode_cache=false) give it as ``image_strong``
beside an unchanged weak view; without the request the batches are as before."""

import pytest
import torch
from fake_data import make_xray_folder

from distill_runner.data.digits import digits
from distill_runner.data.imagefolder import imagefolder
from distill_runner.data.strong_augment import OPS, StrongAugment, cutout, strong_generator
from distill_runner.errors import ConfigError

STRONG = StrongAugment()


def epoch(loader, number: int) -> list[dict]:
    loader.set_epoch(number)
    return list(loader)


def test_every_op_keeps_shape_and_dtype_on_uint8_images():
    image = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    for name, lo, hi, op in OPS:
        for value in (lo, hi, (lo + hi) / 2):
            out = op(image, value)
            assert out.shape == image.shape and out.dtype == torch.uint8, name


def test_draws_are_per_sample_and_reproducible_from_the_generator():
    same = torch.full((16, 3, 12, 12), 100, dtype=torch.uint8)
    same[:, :, 3:9, 3:9] = 200  # a square: geometric ops move it
    first, again = (STRONG(same, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(first, again) and first.dtype == torch.uint8
    assert len({bytes(x.flatten().tolist()) for x in first}) > 8  # identical inputs, different views per sample
    assert not torch.equal(first, STRONG(same, torch.Generator().manual_seed(8)))


def test_cutout_fills_a_gray_square_clipped_to_the_image():
    x = cutout(torch.zeros(3, 10, 10, dtype=torch.uint8), side=4.0, u=0.0, v=0.5)
    filled = (x[0] == 125).nonzero()
    assert filled[:, 1].min() == 0 and filled[:, 1].max() == 4 and x[2].max() == 114  # clipped at the left edge
    assert torch.equal(cutout(x, 0.0, 0.5, 0.5), x)


def test_in_memory_loader_gives_both_views_reproducibly_and_the_weak_view_unchanged():
    data = digits(image_size=16, batch_size=8, limit=24, crop_padding=2, hflip=True)
    before = epoch(data.train, 0)
    assert "image_strong" not in before[0] and data.train.distinct_epochs is None
    data.train.set_strong(STRONG)
    views, again, later = epoch(data.train, 0), epoch(data.train, 0), epoch(data.train, 1)
    for a, b, c in zip(before, views, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
        assert b["image_strong"].shape == b["image"].shape and torch.equal(b["image_strong"], c["image_strong"])
        assert not torch.equal(b["image_strong"], b["image"])
    assert not torch.equal(views[0]["image_strong"], later[0]["image_strong"])
    data.train.set_strong(None)
    assert all(torch.equal(a["image"], b["image"]) and set(b) == set(a) for a, b in zip(before, epoch(data.train, 0)))


def test_without_random_augmentation_the_strong_view_still_makes_every_epoch_distinct():
    data = digits(image_size=8, batch_size=8, limit=16)
    assert data.train.distinct_epochs == 1
    data.train.set_strong(STRONG)
    assert data.train.distinct_epochs is None


def test_the_strong_stream_is_apart_from_the_weak_one():
    weak = torch.Generator().manual_seed(3 * 100_003 + 2)
    assert not torch.equal(torch.rand(4, generator=weak), torch.rand(4, generator=strong_generator(3, 2)))


def test_pil_loader_gives_both_views_reproducibly(tmp_path):
    root = make_xray_folder(tmp_path / "xray")
    data = imagefolder(root=str(root), image_size=16, num_workers=0, decode_cache=False, progress=False)
    before = epoch(data.train, 1)
    data.train.set_strong(STRONG)
    views, again = epoch(data.train, 1), epoch(data.train, 1)
    for a, b, c in zip(before, views, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and b["image_strong"].shape == b["image"].shape
        assert torch.equal(b["image_strong"], c["image_strong"]) and b["image_strong"].dtype == torch.float32
    assert not torch.equal(views[0]["image_strong"], epoch(data.train, 2)[0]["image_strong"])
    assert "image_strong" not in next(iter(data.val))


@pytest.mark.parametrize("kwargs,key", [({"ops": 9}, "strong.ops"), ({"ops": 1.5}, "strong.ops"),
                                        ({"cutout": -0.1}, "strong.cutout")])  # fmt: skip
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        StrongAugment(**kwargs)
    assert err.value.key == key
