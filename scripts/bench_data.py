"""The data path at 224 px: torchvision's ImageFolder + PIL against the decode-once store + tensor augmentation.

Data: N grayscale JPEGs of SIDE x SIDE pixels (smooth chest-like structure plus film-grain noise,
JPEG quality 95: about 500 KB each at 1024 px, the size class of the chest X-rays), two classes,
generated once under ``<data-dir>/xray_<N>x<SIDE>/`` and reused. Every figure is the median of
``repeats`` epochs after one warm-up epoch, files in the page cache (as in a second epoch):

- ``pil_*``: ``torchvision.datasets.ImageFolder`` with Resize((224, 224)), RandomHorizontalFlip,
  ToTensor, Normalize and a ``DataLoader`` (batch 32, shuffled, ``num_workers``/``pin_memory`` as
  the runner picks them: ``imagefolder.loader_settings('auto', 'auto', device)``).
- ``store_*``: the decode-once store (:mod:`distill_runner.data.decode_cache`) read by ``TensorBatches``
  with random resized crop [0.8, 1] + flip, normalized into 3 channels, placed as the runner does
  (``data.on_device=auto``). ``store_build_s``: building it from scratch (all cores decode);
  ``store_open_s``: opening the built store again (header, size and sha256 checks).
- ``*_alone``: iterating the loader without a model; ``*_ce``: a CE-only epoch of the tiny CNN
  (AdamW) fed by it, with the runner's loop (``engine.fit``); ``premade_ce``: the same epoch on
  pre-made normalized float batches (no data path at all). The three CE epochs run in rounds
  (one of each per round), so drift in the machine's speed affects them alike.

Against the goals: ``share_of_ce_epoch`` = the store path's time alone / the CE epoch fed by it
(goal <= 0.05); ``overhead_of_ce_epoch`` = (CE epoch fed by the store - CE epoch on pre-made
batches) / CE epoch fed by the store; ``speedup_vs_pil`` = store / PIL images/s, data path alone
(goal >= 10), and ``speedup_vs_pil_ce`` the same for the fed CE epochs.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from distill_runner.data import decode_cache
from distill_runner.data.augment import Augment
from distill_runner.data.bundle import TensorBatches
from distill_runner.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, loader_settings
from distill_runner.data.prints import RACY_NS, HashIndex
from distill_runner.distill.recipe import Recipe
from distill_runner.models.factories import tiny_cnn
from distill_runner.train import engine

SIZE, BATCH = 224, 32
CLASSES = ("NORMAL", "PNEUMONIA")


def _xray_like(args: tuple[int, int, str]) -> int:
    """Write one synthetic chest-like grayscale JPEG; returns its size in bytes."""
    from PIL import Image

    seed, side, path = args
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    img = (
        70
        + 70 * np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.05)
        + 70 * np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.05)
    )  # lungs
    img += (
        25 * np.sin(2 * np.pi * rng.uniform(8, 20) * y + rng.uniform(0, 6.3)) * np.exp(-((x - 0.5) ** 2) / 0.1)
    )  # ribs
    for _ in range(6 + 6 * (seed % 2)):  # the second class is cloudier
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.02, 0.15)
        img += rng.uniform(-40, 40) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (r * r))
    img += rng.normal(0, 10, img.shape)  # film grain: what makes real X-ray JPEGs large
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(path, quality=95)
    return Path(path).stat().st_size


def make_xray_jpegs(data_dir: Path, n: int, side: int) -> Path:
    """``root/<class>/NNNN.jpeg``, generated once (a marker file says the set is complete)."""
    root = data_dir / f"xray_{n}x{side}"
    marker = root / ".complete"
    if marker.is_file():
        return root
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
    jobs = [(i, side, str(root / CLASSES[i % 2] / f"{i:04d}.jpeg")) for i in range(n)]
    start = time.perf_counter()
    with Pool() as pool:
        sizes = pool.map(_xray_like, jobs, chunksize=8)
    marker.write_text(json.dumps({"images": n, "side": side, "mean_kb": sum(sizes) / n / 1024}))
    print(
        f"generated {n} {side}x{side} grayscale JPEGs in {root} ({sum(sizes) / n / 1024:.0f} KB each on average, "
        f"{time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return root


class _Feed:
    """Batches for ``engine.fit`` from a torchvision (images, targets) DataLoader or a list of pre-made
    batch dicts: the :class:`~distill_runner.data.batches.Batches` members the loop uses (no augmentation
    of its own to replay, one process)."""

    replayable, holds_images = False, False

    def __init__(self, batches, batch_size: int, num_samples: int):
        self.batches, self.batch_size, self.samples = batches, batch_size, num_samples

    def set_epoch(self, epoch: int) -> None:  # the DataLoader shuffles by itself; pre-made batches repeat
        pass

    def shard(self, rank: int, world_size: int, pad: bool = True) -> None:
        raise NotImplementedError("a benchmark feed runs in one process")

    @property
    def num_samples(self) -> int:
        return self.samples

    @property
    def nbytes(self) -> int:
        return self.samples * 3 * SIZE * SIZE

    @property
    def distinct_epochs(self) -> int | None:
        return None

    def place(self, device, resident: bool) -> _Feed:
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield batch if isinstance(batch, dict) else {"image": batch[0], "target": batch[1]}


def _median_epoch_s(loader, repeats: int, device: torch.device) -> float:
    times = []
    for epoch in range(repeats + 1):  # the first is a warm-up
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            batch["image"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch > 0:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _interleaved_ce_epoch_s(feeds: dict, device: torch.device, precision, repeats: int) -> dict[str, float]:
    """Median seconds of a CE-only epoch of the tiny CNN (AdamW, the runner's loop) fed by each
    loader; rounds of one epoch per feed, so a machine whose speed drifts affects all alike."""
    torch.manual_seed(0)
    init = tiny_cnn(num_classes=len(CLASSES))
    times = {name: [] for name in feeds}
    for round_ in range(repeats + 1):  # the first round is a warm-up
        for name, train in feeds.items():
            stage = engine.Stage(
                "bench",
                copy.deepcopy(init),
                Recipe.cross_entropy(),
                1,
                partial(torch.optim.AdamW, lr=1e-3),
                partial(engine.constant_lr),
            )
            start = time.perf_counter()
            engine.fit(stage, train, [], device, precision, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def measure_data_path(
    data_dir: Path, device: torch.device, precision, quick: bool, n: int | None = None, side: int | None = None
) -> dict:
    """The figures above; ``n``/``side`` override the quick or full set's (tests use a handful of small images)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    n, side, repeats = (n or 64, side or 512, 1) if quick else (n or 1000, side or 1024, 2)
    root = make_xray_jpegs(data_dir, n, side)
    workers, pin = loader_settings("auto", "auto", str(device))

    # (a) torchvision ImageFolder + PIL transforms, DataLoader as the runner would set it up
    tf = transforms.Compose(
        [
            transforms.Resize((SIZE, SIZE)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    folder = datasets.ImageFolder(str(root), transform=tf)
    loader = DataLoader(
        folder, batch_size=BATCH, shuffle=True, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0
    )
    pil = _Feed(loader, BATCH, len(folder))
    pil_alone_s = _median_epoch_s(pil, repeats, device)

    # (b) building the store from scratch, then opening it again
    files = [path for path, _ in folder.samples]
    targets = torch.tensor([t for _, t in folder.samples])
    store_dir = data_dir / "store"
    key = decode_cache.store_key(HashIndex(store_dir).sha256(files), SIZE)
    for old in store_dir.glob(f"{key}.*"):
        old.unlink()
    start = time.perf_counter()
    store = decode_cache.open_or_build(files, SIZE, store_dir, progress=False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    store = decode_cache.open_or_build(files, SIZE, store_dir, progress=False)
    open_s = time.perf_counter() - start
    assert not store.built

    # (c) the store + tensor augmentation, placed as data.on_device=auto places it
    augment = Augment(hflip=True, resized_crop_scale=(0.8, 1.0))
    tensor = TensorBatches(
        store.images, targets, BATCH, IMAGENET_MEAN, IMAGENET_STD, shuffle=True, augment=augment, channels=3
    )
    tensor.place(device, resident=device.type == "cuda")
    store_alone_s = _median_epoch_s(tensor, repeats, device)

    # (d) the student's CE epoch: fed by each path, and on pre-made batches
    tensor.set_epoch(0)
    premade = _Feed([{"image": b["image"].clone(), "target": b["target"]} for b in tensor], BATCH, n)
    ce = _interleaved_ce_epoch_s({"premade": premade, "store": tensor, "pil": pil}, device, precision, repeats)
    premade_s, store_ce_s, pil_ce_s = ce["premade"], ce["store"], ce["pil"]
    del pil, loader  # ends the loader's worker processes

    mean_kb = json.loads((root / ".complete").read_text())["mean_kb"]
    result = {
        "images": n,
        "source_side": side,
        "jpeg_mean_kb": round(mean_kb),
        "image_size": SIZE,
        "batch_size": BATCH,
        "repeats": repeats,
        "loader_workers": workers,
        "store_channels": store.images.shape[1],
        "store_mb": store.images.numel() / 2**20,
        "pil_alone_images_per_s": n / pil_alone_s,
        "store_build_s": build_s,
        "store_build_images_per_s": n / build_s,
        "store_open_s": open_s,
        "store_alone_images_per_s": n / store_alone_s,
        "premade_ce_images_per_s": n / premade_s,
        "store_ce_images_per_s": n / store_ce_s,
        "pil_ce_images_per_s": n / pil_ce_s,
        "first_epoch_store_s": build_s + store_ce_s,
        "first_epoch_pil_s": pil_ce_s,
        "share_of_ce_epoch": store_alone_s / store_ce_s,
        "overhead_of_ce_epoch": (store_ce_s - premade_s) / store_ce_s,
        "speedup_vs_pil": pil_alone_s / store_alone_s,
        "speedup_vs_pil_ce": pil_ce_s / store_ce_s,
    }
    result["goals_met"] = {
        "share_of_ce_epoch<=0.05": result["share_of_ce_epoch"] <= 0.05,
        "speedup_vs_pil>=10": result["speedup_vs_pil"] >= 10,
    }
    print(
        f"data path {n} x {side}px JPEGs (~{mean_kb:.0f} KB) at {SIZE}px, {workers} loader workers:  "
        f"PIL {result['pil_alone_images_per_s']:7.0f}  store {result['store_alone_images_per_s']:7.0f} images/s "
        f"alone ({result['speedup_vs_pil']:.0f}x);  "
        f"CE epoch fed by PIL {result['pil_ce_images_per_s']:5.1f}  by the store "
        f"{result['store_ce_images_per_s']:5.1f}  pre-made {result['premade_ce_images_per_s']:5.1f} images/s;  "
        f"store build {build_s:.1f}s ({result['store_build_images_per_s']:.0f} images/s), open {open_s:.2f}s;  "
        f"data path = {100 * result['share_of_ce_epoch']:.1f}% of the CE epoch",
        flush=True,
    )
    return result


def measure_print_cost(data_dir: Path, n: int = 5863, side: int = 640) -> dict:
    """What the data print (:mod:`distill_runner.data.prints`) costs on ``n`` generated X-ray-sized JPEGs
    (5,863 as in the Kaggle chest X-ray set; 640 px at quality 95 is about 200 KB each, the size class
    of its files): ``cold_s`` hashes every file into an empty index (files in the page cache, as right
    after generating them: a cold disk adds its read time), ``warm_s`` is the next run (one ``stat``
    per file, the index read and checked)."""
    root = make_xray_jpegs(data_dir, n, side)
    files = sorted(str(p) for p in root.glob("*/*.jpeg"))
    newest = max(os.stat(f).st_ctime_ns for f in files)
    time.sleep(max(0.0, (newest + RACY_NS - time.time_ns()) / 1e9 + 0.1))  # else the newest are hashed again
    index_dir = data_dir / f"print_index_{n}x{side}"
    shutil.rmtree(index_dir, ignore_errors=True)  # a cold start: no hashes kept
    start = time.perf_counter()
    HashIndex(index_dir).sha256(files)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    HashIndex(index_dir).sha256(files)
    warm_s = time.perf_counter() - start
    total_mb = sum(os.stat(f).st_size for f in files) / 2**20
    result = {
        "files": n,
        "mean_kb": round(total_mb * 1024 / n),
        "total_mb": round(total_mb, 1),
        "cold_s": cold_s,
        "cold_mb_per_s": total_mb / cold_s,
        "warm_s": warm_s,
        "warm_us_per_file": 1e6 * warm_s / n,
        "index_kb": round(sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file()) / 1024),
    }
    print(
        f"data print of {n} JPEGs ({result['mean_kb']} KB each, {total_mb:.0f} MB): cold (hash every file) "
        f"{cold_s:.2f}s ({result['cold_mb_per_s']:.0f} MB/s), warm (stat only) {warm_s:.3f}s "
        f"({result['warm_us_per_file']:.0f} us/file); index {result['index_kb']} KB",
        flush=True,
    )
    return result
