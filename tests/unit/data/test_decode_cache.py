"""The decoded-image store: the same pixels as PIL decoding, invalidated by changed files,
rebuilt when damaged, built once by concurrent jobs, and a fallback to PIL when the disk is full."""

import errno
import logging
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGES, compose_config
from fake_data import make_xray_folder
from PIL import Image
from torchvision.transforms import v2

from distill_runner import build, runner
from distill_runner.config import validate
from distill_runner.data import decode_cache
from distill_runner.data.bundle import TensorBatches
from distill_runner.data.imagefolder import FolderBatches, imagefolder
from distill_runner.data.prints import PRINTS_DIR
from distill_runner.errors import ConfigError

SIZE = 24


def make_images(folder: Path, color: bool = False) -> list[str]:
    """PNGs in every grayscale form PIL has (L, LA, 1, RGB with equal channels), gray JPEGs, and
    with ``color`` one real color PNG."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    gray = lambda: rng.integers(0, 256, (20, 30), dtype=np.uint8)
    images = {
        "l.png": Image.fromarray(gray(), "L"),
        "la.png": Image.fromarray(np.stack([gray(), np.full((20, 30), 99, np.uint8)], -1), "LA"),
        "bw.png": Image.fromarray(gray() > 128),
        "rgb_gray.png": Image.fromarray(np.stack([gray()] * 3, -1), "RGB"),
        "a.jpeg": Image.fromarray(gray(), "L"),
        "b.jpeg": Image.fromarray(gray(), "L"),
    }
    if color:
        images["color.png"] = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB")
    for name, im in images.items():
        im.save(folder / name)
    return sorted(str(p) for p in folder.iterdir())


def pil_path(file: str) -> np.ndarray:
    """What the on-the-fly path decodes: RGB, resized, [3, S, S]."""
    tf = v2.Compose([v2.Resize((SIZE, SIZE), interpolation=decode_cache.INTERPOLATION), v2.PILToTensor()])
    with Image.open(file) as im:
        return tf(im.convert("RGB")).numpy()


@pytest.mark.parametrize("color", [False, True])
def test_store_holds_the_pixels_pil_decodes(tmp_path, color):
    files = make_images(tmp_path / "img", color)
    store = decode_cache.open_or_build(files, SIZE, tmp_path / "store", progress=False)
    assert (
        store.built
        and store.images.dtype == torch.uint8
        and store.images.shape == (len(files), 3 if color else 1, SIZE, SIZE)
    )
    for i, f in enumerate(files):
        expected, got = pil_path(f), store.images[i].numpy()
        got = np.broadcast_to(got, expected.shape)  # a grayscale store's one channel is each of RGB
        if f.endswith(".png"):
            assert np.array_equal(got, expected), f
        else:  # the same decoder: JPEG decoding tolerance (exact in practice)
            assert np.abs(got.astype(int) - expected).max() <= 1, f


def test_store_backed_bundle_equals_the_pil_path(tmp_path):
    root = make_xray_folder(tmp_path / "xray")
    stored = imagefolder(root=str(root), image_size=SIZE, num_workers=0, progress=False)
    pil = imagefolder(root=str(root), image_size=SIZE, num_workers=0, decode_cache=False)
    assert isinstance(stored.train, TensorBatches) and isinstance(pil.train, FolderBatches)
    assert stored.train.images.shape[1] == 1  # gray JPEGs and the equal-channel RGB/RGBA PNGs
    assert stored.class_counts == pil.class_counts and stored.fingerprint == pil.fingerprint
    for split in ("val", "test"):
        a, b = [torch.cat([batch[k] for batch in getattr(d, split)]) for d in (stored, pil) for k in ("image",)]
        assert a.shape[1] == 3 and torch.equal(a, b)


def test_changed_added_or_removed_files_give_a_new_store(tmp_path, caplog):
    """The key holds the files' content: a touched file (same bytes) reuses the store; a file whose bytes
    change with its size and whole-second mtime restored (``cp -p``, ``tar x``) does not."""
    files = make_images(tmp_path / "img")
    build = lambda fs: decode_cache.open_or_build(fs, SIZE, tmp_path / "store", progress=False)
    first = build(files)
    with caplog.at_level(logging.INFO):
        again = build(files)
    assert not again.built and again.key == first.key and "decoded-image store reused" in caplog.text
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    touched = build(files)
    jpeg = next(f for f in files if f.endswith("a.jpeg"))
    st = os.stat(jpeg)
    other = Path(jpeg).with_name("b.jpeg").read_bytes()
    Path(jpeg).write_bytes(other[: st.st_size].ljust(st.st_size, b"\0"))  # new bytes, same size ...
    os.utime(jpeg, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime
    rewritten = build(files)
    Image.fromarray(np.zeros((20, 30), np.uint8), "L").save(tmp_path / "img" / "new.png")
    added = build(sorted(files + [str(tmp_path / "img" / "new.png")]))
    removed = build(files[1:])
    assert not touched.built and touched.key == first.key
    keys = [first.key, rewritten.key, added.key, removed.key]
    assert len(set(keys)) == 4 and rewritten.built and added.built and removed.built
    assert len(added.images) == len(files) + 1 and len(removed.images) == len(files) - 1
    assert torch.equal(removed.images[1:], rewritten.images[2:])


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "truncated or damaged"),
        ("flip_byte", "fails its sha256 check"),
        ("no_header", "has no header"),
        ("bad_header", "unreadable header"),
    ],
)
def test_damaged_store_is_detected_and_rebuilt(tmp_path, caplog, damage, message):
    files = make_images(tmp_path / "img")
    first = decode_cache.open_or_build(files, SIZE, tmp_path / "store", progress=False)
    pixels = first.images.clone()
    data, header = first.path, first.path.with_suffix(".json")
    del first
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(raw[:-100])
    elif damage == "flip_byte":
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(raw)
    elif damage == "no_header":
        header.unlink()
    else:
        header.write_text("{not json")
    with caplog.at_level(logging.INFO):
        store = decode_cache.open_or_build(files, SIZE, tmp_path / "store", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(message in w and "rebuilding it" in w for w in warnings), warnings
    assert store.built and torch.equal(store.images, pixels)


def _build_in_child(files, folder, barrier, results):
    barrier.wait()  # both processes ask for the store at the same moment
    store = decode_cache.open_or_build(files, SIZE, folder, progress=False)
    results.put((store.built, store.key, store.images.numpy().tobytes()))


@pytest.mark.slow
def test_two_processes_building_the_same_store_make_one(tmp_path):
    files = make_images(tmp_path / "img")
    for i in range(40):  # enough images that the builds would overlap without the lock
        Image.fromarray(np.full((60, 80), i, np.uint8), "L").save(tmp_path / "img" / f"x{i}.png")
    files = sorted(str(p) for p in (tmp_path / "img").iterdir())
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(files, tmp_path / "store", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for built, _, _ in outcomes) == [False, True]  # one built, the other waited and reused it
    assert outcomes[0][1:] == outcomes[1][1:]
    left = sorted(p.name for p in (tmp_path / "store").iterdir() if p.name != PRINTS_DIR)
    key = outcomes[0][1]
    assert left == [f"{key}.json", f"{key}.lock", f"{key}.u8"]


@pytest.mark.parametrize("how", ["while_writing", "up_front"])
def test_full_disk_warns_and_falls_back_to_pil_leaving_nothing(tmp_path, monkeypatch, caplog, how):
    root = make_xray_folder(tmp_path / "xray")
    if how == "while_writing":

        def full(f, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(decode_cache, "_write", full)
    else:
        real = decode_cache.shutil.disk_usage
        monkeypatch.setattr(decode_cache.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with caplog.at_level(logging.INFO):
        data = imagefolder(
            root=str(root), image_size=SIZE, num_workers=0, store_dir=str(tmp_path / "store"), progress=False
        )
    assert isinstance(data.train, FolderBatches)
    (warning,) = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "decoded-image store" in r.getMessage()
    ]
    assert (
        str(tmp_path / "store") in warning
        and "it needs 0.0 MB" in warning
        and "are free" in warning
        and "decoding with PIL on the fly" in warning
    )
    left = [p.suffix for p in (tmp_path / "store").iterdir() if p.name != PRINTS_DIR]
    assert left == [".lock"]  # no partial store, no temp file
    assert next(iter(data.test))["image"].shape == (6, 3, SIZE, SIZE)


def xray_cfg(root, *extra):
    return compose_config(
        [
            *TINY_IMAGES,
            "dataset.image_size=24",
            "teacher.weights=null",
            f"dataset.root={root}",
            "dataset.num_workers=0",
            *extra,
        ],
        experiment="xray_kd",
    )


def test_decode_cache_switch_picks_the_loader(tmp_path):
    root = make_xray_folder(tmp_path / "xray")
    assert isinstance(build.build_data(xray_cfg(root)).train, TensorBatches)
    assert isinstance(build.build_data(xray_cfg(root, "data.decode_cache=false")).train, FolderBatches)
    assert list((tmp_path / "outputs" / "cache" / "decoded").glob("*.u8"))  # under ${cache.dir}/decoded


@pytest.mark.slow
def test_store_backed_xray_runs_replay_teacher_outputs_and_follow_file_changes(tmp_path, caplog):
    root = make_xray_folder(tmp_path / "xray")
    with caplog.at_level(logging.INFO):
        runner.run(xray_cfg(root), tmp_path / "a")
    assert (
        "decoding 28 images once" in caplog.text
        and "teacher outputs: cached" in caplog.text
        and "fine-tuning teacher" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        runner.run(xray_cfg(root), tmp_path / "b")
    assert (
        "decoded-image store reused" in caplog.text
        and "reusing teacher" in caplog.text
        and "teacher outputs: cached" in caplog.text
    )
    assert "teacher outputs: cached" in caplog.text and "reused from" in caplog.text
    caplog.clear()
    victim = next((root / "train" / "NORMAL").glob("*.jpeg"))
    Image.fromarray(np.full((40, 48), 255, np.uint8), "L").save(victim)  # the image set changed
    with caplog.at_level(logging.INFO):
        runner.run(xray_cfg(root), tmp_path / "c")
    assert (
        "decoding 28 images once" in caplog.text
        and "fine-tuning teacher" in caplog.text
        and "computed and stored" in caplog.text
    )


def test_resident_store_and_memory_map_give_the_same_batches(tmp_path):
    root = make_xray_folder(tmp_path / "xray")

    def epochs(on_device):
        data = build.build_data(xray_cfg(root, f"data.on_device={on_device}", "dataset.batch_size=8"))
        assert (data.train.rows is None) == (on_device == "true")  # resident: copied out of the memory map
        out = []
        for e in (0, 1):
            data.train.set_epoch(e)
            out += [(b["index"], b["image"]) for b in data.train]
        return out

    a, b = epochs("true"), epochs("false")
    assert len(a) == 6 and all(torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(a, b))


@pytest.mark.parametrize(
    "override",
    [
        "data.on_device=sometimes",
        "data.decode_cache=maybe",
        "dataset.decode_cache=1",
        "dataset.resized_crop_scale=[0.5]",
        "dataset.resized_crop_scale=[0.9,0.5]",
    ],
)
def test_data_keys_are_validated(override):
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}="):
        validate(compose_config(["dataset=chest_xray", override]))


def test_pil_fallback_trains_the_same_augmentation_ranges(tmp_path):
    root = make_xray_folder(tmp_path / "xray")
    data = build.build_data(xray_cfg(root, "data.decode_cache=false"))
    (crop,) = [t for t in data.train.dataset.transform.transforms if isinstance(t, v2.RandomResizedCrop)]
    assert tuple(crop.scale) == (0.8, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    stored = build.build_data(xray_cfg(root)).train.augment
    assert (
        stored.resized_crop_scale == (0.8, 1.0)
        and stored.resized_crop_ratio == pytest.approx((3 / 4, 4 / 3))
        and stored.hflip
    )


def test_cache_keys_follow_the_image_files_not_where_the_store_lives(tmp_path):
    from distill_runner.io.cache import baseline_key, teacher_key

    cfg, moved = xray_cfg(tmp_path), xray_cfg(tmp_path, "cache.dir=elsewhere", "trainer.progress=true")
    for key in (lambda c, fp: teacher_key(c, "teacher", fp), baseline_key):
        assert key(cfg, "files-a") == key(moved, "files-a")  # store_dir and progress say nothing about the images
        assert key(cfg, "files-a") != key(cfg, "files-b") != key(cfg, None)


def test_a_file_that_fails_to_decode_is_recorded_not_fatal(tmp_path):
    from fake_data import truncate_jpeg

    files = make_images(tmp_path / "img")
    victim = next(f for f in files if f.endswith(".jpeg"))
    truncate_jpeg(Path(victim))
    store = decode_cache.open_or_build(files, SIZE, tmp_path / "store", progress=False)
    assert store.built and list(store.undecodable) == [victim] and "truncated" in store.undecodable[victim]
    assert not store.images[files.index(victim)].any()  # its row stays zero; the caller skips it
    again = decode_cache.open_or_build(files, SIZE, tmp_path / "store", progress=False)
    assert not again.built and again.undecodable == store.undecodable  # known without decoding again
