"""Tiny data sets in the real on-disk formats: an ImageFolder in the chest X-ray layout and the
CIFAR-10/100 python-pickle folders."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill_runner.data.bundle import DataBundle, TensorBatches

XRAY_CLASSES = ("NORMAL", "PNEUMONIA")


def _image(rng: np.random.Generator, cls: int, size=(40, 48)) -> np.ndarray:
    """A grayscale picture whose brightness depends on the class (so it is learnable)."""
    base = 60 + 120 * cls
    return np.clip(rng.normal(base, 25, size), 0, 255).astype(np.uint8)


def make_xray_folder(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``root/{train,val,test}/{NORMAL,PNEUMONIA}``: grayscale JPEGs (as the real set), plus in
    train an RGB PNG, an RGBA PNG, a corrupt .jpeg, a .DS_Store and a notes.txt."""
    counts = counts or {"train": 10, "val": 2, "test": 3}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c, cls in enumerate(XRAY_CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(rng, c), mode="L").save(folder / f"{split}-{cls}-{i}.jpeg", quality=90)
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    Image.fromarray(np.stack([_image(rng, 0)] * 3, -1), mode="RGB").save(normal / "rgb.png")
    rgba = np.concatenate([np.stack([_image(rng, 1)] * 3, -1), np.full((40, 48, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, mode="RGBA").save(pneumonia / "rgba.png")
    (pneumonia / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" + bytes(range(256)))
    (normal / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (normal / "notes.txt").write_text("not an image\n")
    return root


def truncate_jpeg(path: Path) -> None:
    """Cut a JPEG 40 bytes into its pixel data: the headers are intact, so ``Image.verify()`` passes."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 40])


def truncate_png_pixels(path: Path) -> None:
    """Cut the compressed pixel data of a PNG to a third, with valid chunk lengths and CRCs (what a
    bad copy that was re-saved chunk by chunk looks like): ``Image.verify()`` passes, decoding fails."""
    data, out, pos = path.read_bytes(), [], 8
    out.append(data[:8])
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IDAT":
            body = body[: len(body) // 3]
        out.append(struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body)))
        pos += 12 + n
    path.write_bytes(b"".join(out))


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as the real CIFAR files hold them:
    loaded with ``encoding='bytes'`` they are bytes, with ``encoding='latin1'`` (torchvision) str."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def make_cifar(
    root: Path, variant: str = "cifar10", per_class: int = 2, num_classes: int | None = None, seed: int = 0
) -> Path:
    """The extracted python-pickle folder of CIFAR-10 (``cifar-10-batches-py/``: data_batch_1..5,
    test_batch, batches.meta) or CIFAR-100 (``cifar-100-python/``: train, test, meta) with
    ``per_class`` images per class in each file. Returns ``root``."""
    rng = np.random.default_rng(seed)
    k = num_classes or (10 if variant == "cifar10" else 100)

    def batch(label: bytes, label_key: bytes) -> dict:
        labels = [c for c in range(k) for _ in range(per_class)]
        rng.shuffle(labels)
        data = np.stack([np.stack([_image(rng, c % 2, (32, 32))] * 3).reshape(-1) for c in labels]).astype(np.uint8)
        entry = {
            b"batch_label": label,
            label_key: labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
        }
        if variant == "cifar100":
            entry[b"coarse_labels"] = [c // 5 for c in labels]
        return entry

    if variant == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            _dump(batch(f"training batch {i} of 5".encode(), b"labels"), folder / f"data_batch_{i}")
        _dump(batch(b"testing batch 1 of 1", b"labels"), folder / "test_batch")
        _dump(
            {
                b"num_cases_per_batch": per_class * k,
                b"label_names": [f"class{c}".encode() for c in range(k)],
                b"num_vis": 3072,
            },
            folder / "batches.meta",
        )
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump(batch(b"training batch 1 of 1", b"fine_labels"), folder / "train")
        _dump(batch(b"testing batch 1 of 1", b"fine_labels"), folder / "test")
        _dump(
            {
                b"fine_label_names": [f"fine{c}".encode() for c in range(k)],
                b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)],
            },
            folder / "meta",
        )
    return root


def skip_cifar_md5(monkeypatch) -> None:
    """torchvision checks the MD5 sums of the real CIFAR files; accept any existing file instead."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def two_class_data(n=40, size=16):
    """Images whose class is whether their top half is brighter: learnable, and two classes for ROC-AUC."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 128, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    targets = torch.arange(n) % 2
    images[targets == 1, :, : size // 2] += 100
    split = lambda: TensorBatches(images, targets, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    return DataBundle(
        split(),
        split(),
        split(),
        num_classes=2,
        class_names=["dim", "bright"],
        image_size=size,
        name="halves",
        class_counts={"test": [n // 2, n // 2]},
    )
