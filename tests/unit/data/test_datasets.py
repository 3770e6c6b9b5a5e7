"""Real data sets in their real on-disk formats: the chest X-ray ImageFolder, CIFAR-10/100, any
ImageFolder; their bad-input errors; balance options; reproducible ImageFolder epochs."""

import json
import logging
import shutil
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_IMAGES, compose_config
from fake_data import make_cifar, make_xray_folder, skip_cifar_md5, truncate_jpeg, truncate_png_pixels
from PIL import Image

from distill_runner import build as builders
from distill_runner import runner
from distill_runner.build import build_data
from distill_runner.config import validate
from distill_runner.data.imagefolder import imagefolder
from distill_runner.errors import ConfigError
from distill_runner.models.checkpoints import load_checkpoint
from distill_runner.models.factories import tiny_cnn


@pytest.fixture
def xray(tmp_path):
    return make_xray_folder(tmp_path / "chest_xray")


def xray_cfg(root, *extra):
    return compose_config(
        ["dataset.image_size=32", "teacher.weights=null", f"dataset.root={root}", "dataset.num_workers=0", *extra],
        experiment="xray_kd",
    )


@pytest.mark.slow
def test_xray_kd_runs_end_to_end_and_reports_skipped_files_and_class_counts(xray, tmp_path, caplog, monkeypatch):
    recipes_seen = []
    real_ce = builders.cross_entropy

    def seen(data, model, *args):
        recipes_seen.append(real_ce(data, model, *args))
        return recipes_seen[-1]

    monkeypatch.setattr(builders, "cross_entropy", seen)
    cfg = compose_config(
        [
            *TINY_IMAGES,
            "dataset.image_size=32",
            "teacher.weights=null",
            f"dataset.root={xray}",
            "dataset.num_workers=0",
            "dataset.eval_batch_size=8",
            "dataset.balance=class_weights",
        ],
        experiment="xray_kd",
    )
    with caplog.at_level(logging.INFO):
        metrics = runner.run(cfg, tmp_path / "run")

    assert metrics.dataset == "chest_xray" and metrics.class_names == ["NORMAL", "PNEUMONIA"]
    # train/: 10 JPEGs + rgb.png | 10 JPEGs + rgba.png + corrupt.jpeg; 10% carved for val; val/ unused
    assert metrics.class_counts == {"train": [10, 10], "val": [1, 1], "test": [3, 3]}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["class_counts"] == metrics.class_counts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 1 unreadable image file(s)" in w and "corrupt.jpeg" in w for w in warnings), warnings
    assert "class counts (NORMAL, PNEUMONIA): train [10, 10]; val [1, 1]; test [3, 3]" in caplog.text
    assert "val = 10% of train (stratified, seed 0)" in caplog.text and "val/ is not used" in caplog.text
    weights_seen = [r.terms["ce"].class_weights.tolist() for r in recipes_seen]
    assert weights_seen == [[1.0, 1.0]] * 2  # the teacher's and the baseline's cross-entropy
    assert "student" in metrics.models and 0 <= metrics.models["student"].test_acc <= 1


def test_xray_images_are_3_channel_resized_and_normalized(xray):
    data = build_data(xray_cfg(xray))
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 32)
    batch = next(iter(data.test))
    assert batch["image"].shape == (6, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["target"].tolist() == [0, 0, 0, 1, 1, 1] and batch["index"].tolist() == list(range(6))
    gray = batch["image"][0]
    assert torch.allclose(gray[0] * 0.229 + 0.485, gray[1] * 0.224 + 0.456, atol=1e-5)  # grayscale -> equal channels


def test_imagefolder_epochs_are_reproducible_with_or_without_workers(xray):
    def epochs(workers):  # the PIL path (no decoded-image store): DataLoader workers
        data = imagefolder(
            root=str(xray), image_size=16, batch_size=5, num_workers=workers, device="cpu", decode_cache=False
        )
        out = []
        for epoch in (0, 0, 1):
            data.train.set_epoch(epoch)
            out.append([(b["index"], b["image"]) for b in data.train])
        return out

    a, b = epochs(0), epochs(1)
    same = lambda x, y: all(torch.equal(i, j) and torch.equal(u, v) for (i, u), (j, v) in zip(x, y))
    assert same(a[0], a[1]) and same(a[0], b[0]) and same(a[2], b[2])
    assert not same(a[0], a[2])
    assert sorted(torch.cat([i for i, _ in a[0]]).tolist()) == list(range(22))
    # the flip is drawn per sample and epoch: some image looks different in another epoch
    e0 = {int(i): x for idx, img in a[0] for i, x in zip(idx, img)}
    e1 = {int(i): x for idx, img in a[2] for i, x in zip(idx, img)}
    assert any(not torch.equal(e0[i], e1[i]) for i in e0)


def test_single_folder_is_split_stratified_and_seeded(tmp_path):
    for cls, n in (("cats", 10), ("dogs", 20)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (20, 20), (i * 10, 0, 0)).save(tmp_path / cls / f"{i}.png")
    # the store goes outside the data root (here the working folder), or it would be read as a class folder
    split = lambda: imagefolder(
        root=str(tmp_path), image_size=16, val_from_train=0.25, test_fraction=0.2, num_workers=0, decode_cache=False
    )
    data = split()
    assert data.class_names == ["cats", "dogs"]
    assert data.class_counts == {"train": [6, 12], "val": [2, 4], "test": [2, 4]}
    again = split()
    assert [p for p, _ in data.test.dataset.samples] == [p for p, _ in again.test.dataset.samples]


def test_balance_options(xray):
    for p in sorted((xray / "train" / "NORMAL").glob("train-*.jpeg"))[:6]:
        p.unlink()  # train: NORMAL 5, PNEUMONIA 11 (after the corrupt file is skipped)
    data = imagefolder(root=str(xray), image_size=16, num_workers=0, balance="class_weights")
    assert data.class_counts["train"] == [5, 11]
    assert data.class_weights == pytest.approx([16 / (2 * 5), 16 / (2 * 11)])
    data = imagefolder(root=str(xray), image_size=16, num_workers=0, balance="weighted_sampler", batch_size=16)
    assert data.class_weights is None
    drawn = []
    for epoch in range(20):
        data.train.set_epoch(epoch)
        drawn += [t for b in data.train for t in b["target"].tolist()]
    assert len(drawn) == 20 * 16 and 0.4 < np.mean(drawn) < 0.6  # balanced draws, not 11/16


def test_balance_options_for_in_memory_data():
    from distill_runner.data.bundle import Augment, in_memory_bundle

    targets = torch.tensor([0] * 30 + [1] * 10)
    splits = {"train": np.arange(40), "val": np.arange(28, 32), "test": np.arange(28, 32)}  # both classes
    bundle = lambda balance: in_memory_bundle(
        torch.zeros(40, 3, 8, 8, dtype=torch.uint8),
        targets,
        splits,
        ["a", "b"],
        40,
        8,
        Augment(),
        0,
        "toy",
        [0.5] * 3,
        [0.5] * 3,
        balance=balance,
    )
    assert (
        bundle("class_weights").class_weights == pytest.approx([40 / 60, 40 / 20])
        and bundle("none").class_weights is None
    )
    train = bundle("weighted_sampler").train
    drawn = []
    for epoch in range(20):
        train.set_epoch(epoch)
        drawn += [t for b in train for t in b["target"].tolist()]
    assert len(drawn) == 800 and 0.4 < np.mean(drawn) < 0.6  # balanced draws, not 10/40


@pytest.mark.slow
def test_cifar10_kd_runs_end_to_end_offline(tmp_path, monkeypatch):
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path / "data")
    cfg = compose_config(
        [*TINY, f"dataset.root={tmp_path / 'data'}", "dataset.download=false", "dataset.eval_batch_size=16"],
        experiment="cifar10_kd",
    )
    metrics = runner.run(cfg, tmp_path / "run")
    assert metrics.dataset == "cifar10" and metrics.num_classes == 10
    assert metrics.class_counts["test"] == [2] * 10 and sum(metrics.class_counts["train"]) == 48  # dataset.limit=48
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.parametrize("variant,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_bundle_in_memory_at_32px(tmp_path, monkeypatch, variant, classes):
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path, variant, per_class=2 if classes == 100 else 10)  # 500 / 200 training images
    fraction = 0.1 if classes == 10 else 0.5  # at least one validation image per class
    cfg = compose_config(
        [
            f"dataset={variant}",
            f"dataset.root={tmp_path}",
            "dataset.download=false",
            f"dataset.val_from_train={fraction}",
        ]
    )
    data = build_data(cfg)
    assert (
        data.num_classes == classes
        and data.image_size == 32
        and data.train.augment.crop_padding == 4
        and data.train.augment.hflip
    )
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert data.class_counts["val"] == [5 if classes == 10 else 1] * classes  # stratified
    batch = next(iter(data.val))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].abs().max() < 5


def test_cifar_archive_placed_by_hand_is_extracted_offline(tmp_path, monkeypatch):
    import tarfile

    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path / "made")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = build_data(compose_config(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"]))
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file() and data.class_counts["test"] == [2] * 10


def test_cifar_offline_errors_say_where_the_files_go(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    cfg = compose_config(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"])
    with pytest.raises(ConfigError, match=r"^dataset\.root=") as err:
        build_data(cfg)
    assert (
        "cifar-10-python.tar.gz" in str(err.value)
        and "cifar-10-batches-py/" in str(err.value)
        and "download=true" in str(err.value)
    )

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    cfg = compose_config(["dataset=cifar10", f"dataset.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^dataset\.download=True: downloading https://") as err:
        build_data(cfg)
    assert (
        "cifar-10-python.tar.gz" in str(err.value)
        and str(tmp_path) in str(err.value)
        and "dataset.download=false" in str(err.value)
    )


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        build_data(cfg)
    return str(err.value)


def test_missing_root_prints_the_expected_tree_and_the_source(tmp_path):
    msg = _error(xray_cfg(tmp_path / "nowhere"))
    assert msg.startswith(f"dataset.root='{tmp_path / 'nowhere'}': no such folder")
    assert (
        "train/{NORMAL,PNEUMONIA}/*.jpeg" in msg
        and "test/{NORMAL,PNEUMONIA}/*.jpeg" in msg
        and "Chest X-Ray Images (Pneumonia)" in msg
    )
    make_xray_folder(tmp_path / "chest_xray")  # the zip's outer folder given as root
    assert f"use dataset.root={tmp_path}/chest_xray" in _error(xray_cfg(tmp_path))
    assert "dataset=imagefolder needs dataset.root=PATH" in _error(compose_config(["dataset=imagefolder"]))


def test_missing_split_names_it(xray):
    shutil.rmtree(xray / "val")
    assert "the val/ split is missing; or set dataset.val_from_train=0.1" in _error(
        xray_cfg(xray, "dataset.val_from_train=null")
    )
    build_data(xray_cfg(xray))  # the default carves val from train: no val/ needed
    shutil.rmtree(xray / "test")
    assert "the test/ split is missing. Expected:" in _error(xray_cfg(xray))


def test_class_folders_differing_between_splits(xray):
    shutil.rmtree(xray / "test" / "PNEUMONIA")
    msg = _error(xray_cfg(xray))
    assert "class folders differ between splits" in msg and "missing in test: ['PNEUMONIA']" in msg


def test_empty_class_folder(xray):
    for p in (xray / "val" / "NORMAL").iterdir():
        p.unlink()
    (xray / "val" / "NORMAL" / ".DS_Store").write_bytes(b"\x00")  # not an image: still empty
    msg = _error(xray_cfg(xray, "dataset.val_from_train=null"))
    assert "class folder" in msg and "val/NORMAL is empty" in msg


def test_on_bad_image_error_lists_the_files(xray):
    msg = _error(xray_cfg(xray, "dataset.on_bad_image=error"))
    assert (
        msg.startswith("dataset.on_bad_image='error': 1 unreadable image file(s)")
        and "train/PNEUMONIA/corrupt.jpeg" in msg
    )
    assert "dataset.on_bad_image=skip" in msg


@pytest.mark.parametrize("decode_cache", [True, False])
def test_truncated_jpeg_that_passes_the_check_fails_naming_the_file(xray, decode_cache):
    """on_bad_image=error: one line naming the file, before training, with or without the store."""
    (xray / "train" / "PNEUMONIA" / "corrupt.jpeg").unlink()  # fails the header check: another error
    victim = next((xray / "test" / "NORMAL").glob("*.jpeg"))
    truncate_jpeg(victim)
    cfg = xray_cfg(xray, f"data.decode_cache={str(decode_cache).lower()}", "dataset.on_bad_image=error")
    msg = _error(cfg)
    assert msg.startswith("dataset.on_bad_image='error': 1 undecodable") and "test/NORMAL/" + victim.name in msg
    assert "\n" not in msg and "dataset.on_bad_image=skip" in msg
    if decode_cache:  # the store is kept, with the file recorded: the next run says the same without decoding
        assert _error(cfg) == msg


@pytest.mark.parametrize("decode_cache", [True, False])
def test_truncated_jpeg_and_png_that_pass_the_check_are_skipped_naming_them(xray, decode_cache, caplog):
    jpeg = next((xray / "test" / "NORMAL").glob("*.jpeg"))
    truncate_jpeg(jpeg)
    png = xray / "train" / "NORMAL" / "rgb.png"
    truncate_png_pixels(png)
    cfg = xray_cfg(xray, f"data.decode_cache={str(decode_cache).lower()}")
    for run in range(2 if decode_cache else 1):  # the second run reuses the store
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data = build_data(cfg)
        warning = next(r.getMessage() for r in caplog.records if "undecodable" in r.getMessage())
        assert "skipped 2 undecodable" in warning and jpeg.name in warning and "rgb.png" in warning, run
        # train/ NORMAL: 10 + rgb.png (cut), PNEUMONIA: 10 + rgba.png + corrupt.jpeg; 1 + 1 carved for val
        assert data.class_counts == {"train": [9, 10], "val": [1, 1], "test": [2, 3]}
        seen = [b["target"].tolist() for b in data.test]  # every image decodes: no error in the loop
        assert sum(map(len, seen)) == 5


def test_a_class_whose_test_images_are_all_unreadable_is_refused_before_training(xray):
    for path in (xray / "test" / "PNEUMONIA").glob("*.jpeg"):
        truncate_jpeg(path)
    for decode_cache in ("true", "false"):
        msg = _error(xray_cfg(xray, f"data.decode_cache={decode_cache}"))
        assert msg.startswith(f"dataset.root='{xray}': the test split has no images of class PNEUMONIA;"), msg
        assert f"add readable images to {xray / 'test' / 'PNEUMONIA'}" in msg and "\n" not in msg


def test_a_class_whose_val_images_fail_the_header_check_is_refused(xray):
    for path in (xray / "val" / "NORMAL").glob("*.jpeg"):
        path.write_bytes(b"not an image")
    msg = _error(xray_cfg(xray, "dataset.val_from_train=null"))
    assert msg.startswith(f"dataset.root='{xray}': the val split has no images of class NORMAL;"), msg


def test_a_single_class_is_refused(tmp_path):
    make_xray_folder(tmp_path / "xray")
    for split in ("train", "val", "test"):
        shutil.rmtree(tmp_path / "xray" / split / "PNEUMONIA")
    msg = _error(xray_cfg(tmp_path / "xray"))
    assert msg.startswith(f"dataset.root='{tmp_path / 'xray'}': the data set has a single class (NORMAL)"), msg


def test_in_memory_data_without_a_class_in_a_split_is_refused_unless_limited(caplog):
    from distill_runner.data.bundle import in_memory_bundle

    targets = torch.tensor([0] * 6 + [1] * 4)
    splits = {"train": np.arange(10), "val": np.arange(2), "test": np.arange(6, 10)}  # val: class a only
    make = lambda limited: in_memory_bundle(
        torch.zeros(10, 3, 4, 4, dtype=torch.uint8), targets, splits, ["a", "b"], 4, 4, None, 0, "toy", limited=limited
    )
    with pytest.raises(ConfigError, match="the val split has no images of class b"):
        make(False)
    with caplog.at_level(logging.WARNING):
        make(True)
    assert "dataset.limit leaves class(es) ['b'] out of the val split" in caplog.text


def test_checkpoint_with_another_class_count_says_so(tmp_path):
    torch.save(tiny_cnn(num_classes=10).state_dict(), tmp_path / "t.pt")
    with pytest.raises(ConfigError, match="the checkpoint has 10 classes, the data set has 2"):
        load_checkpoint(tiny_cnn(num_classes=2), tmp_path / "t.pt")


@pytest.mark.parametrize(
    "dataset,override",
    [
        ("chest_xray", "dataset.balance=oversample"),
        ("chest_xray", "dataset.on_bad_image=ignore"),
        ("chest_xray", "dataset.val_from_train=1.5"),
        ("imagefolder", "dataset.num_workers=-1"),
        ("cifar10", "dataset.download=maybe"),
    ],
)
def test_dataset_keys_are_validated(dataset, override):
    cfg = compose_config([f"dataset={dataset}", override])
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}="):
        validate(cfg)


def test_an_unwritable_store_folder_is_one_line_with_the_ways_out_even_with_the_cache_off(xray, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a cache.dir below a file cannot be created (root or not)
    msg = _error(xray_cfg(xray, "cache.enabled=false", f"cache.dir={blocker / 'cache'}"))
    assert msg.startswith(f"dataset.store_dir='{blocker / 'cache' / 'decoded'}': cannot write the decoded-image store")
    assert "cache.dir=PATH" in msg and "data.decode_cache=false" in msg and "\n" not in msg


def _class_folders(root, counts: dict[str, int]):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), i).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "counts,val,test,says",
    [
        (
            {"cats": 1, "dogs": 20},
            0.1,
            0.2,
            "the test split carved from the single folder needs at least 2 images of "
            "every class, and class cats has 1: add images of it",
        ),
        (
            {"cats": 3, "dogs": 3, "owls": 3},
            0.1,
            0.2,
            "the test split carved from the single folder would hold 1 of 9 images, fewer than one per class "
            "(3 classes), so a class (e.g. cats, the smallest) would be missing: use a larger fraction (at least "
            "0.34) or add images",
        ),
        ({"cats": 10, "dogs": 10}, 0.01, 0.2, "the val split carved from the train split would hold 0 of 16 images"),
        ({"cats": 10, "dogs": 10}, 0.99, 0.2, "would leave 1 of 16 images for the rest"),
    ],
)
def test_split_errors_name_the_split_the_class_and_the_fix(tmp_path, counts, val, test, says):
    root = _class_folders(tmp_path / "pets", counts)
    with pytest.raises(ConfigError) as err:
        imagefolder(root=str(root), image_size=8, val_from_train=val, test_fraction=test, num_workers=0,
                    decode_cache=False)  # fmt: skip
    message = str(err.value)
    assert says in message and "\n" not in message
    assert "least populated" not in message and "should be greater" not in message  # not scikit-learn's words
