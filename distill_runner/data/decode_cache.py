"""Decode once: an ImageFolder's images decoded, converted and resized into one uint8 store.

Decoding a chest X-ray JPEG costs more than the student's training step on it, and every epoch of
every run would decode the same files again. So they are decoded once, by PIL exactly as the
on-the-fly path does it (:func:`distill_runner.data.images.to_8bit`: upright by EXIF, 8 bits per
mode, then ``Resize((size, size))``, bilinear), into ``<store_dir>/<key>.u8``: raw uint8
``[N, C, size, size]``, one row per file in the order given. C is 1 when every image is
grayscale (a gray PIL mode, or RGB whose three channels are equal after resizing), else 3; the
model's 3 channels come from broadcasting when the batch is normalized
(:class:`distill_runner.data.bundle.TensorBatches`). Later epochs, runs and sweep jobs memory-map
the file (parallel jobs share its pages through the OS page cache).

``<key>.json``, renamed into place after the data file, describes it: format, key, shape, the
sha256 of the data file, and the file list with each file's content hash. A data file without its
header is never used. The key is a digest of the files' content hashes in order
(:class:`distill_runner.data.prints.HashIndex`: hashed once, then one ``stat`` per file while
unchanged), the size, the channel rule and the resampling: changing, adding, removing or reordering
an image, or another ``image_size``, gives another key, so another store, whatever the files' paths,
sizes and modification times say.

Checked on every open: the header parses and names this key and format; the data file is exactly
N*C*size*size bytes (a truncated or extended file fails); its sha256 equals the header's. Up to
``FULL_CHECK_BYTES`` (1 GiB) the hash covers the whole file, so any changed byte is detected. Above that it
covers 64 evenly spaced 1 MiB blocks (first and last included): size changes and damage inside those blocks
are detected, damage elsewhere is not. A store that fails a check is named in a warning and rebuilt.

The store is a :class:`~distill_runner.io.store.KeyedStore`, as the teacher cache is: building holds
``<key>.lock`` (a parallel sweep job waits on it, then finds the finished store) and writes temp files
that are renamed into place (:func:`distill_runner.io.storage.writing`). If the disk lacks the space (checked up front,
or ENOSPC/EDQUOT while writing), a warning names the folder, the bytes needed and free, nothing
partial is left, and :func:`open_or_build` returns None: the caller decodes on the fly instead.

A file that fails to decode (truncated: it passed the header check) does not stop the build: its
row stays zero and the header lists its content hash under ``undecodable`` with the reason
(:attr:`Store.undecodable`: the files that hold that content now), so the caller skips or refuses
it, on this run and on every run that reuses the store, without decoding again.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from distill_runner.data.images import GRAY_MODES, to_8bit
from distill_runner.data.prints import HashIndex
from distill_runner.errors import ConfigError
from distill_runner.io.cache import digest
from distill_runner.io.storage import DISK_FULL, sha256_from_start, writing
from distill_runner.io.store import KeyedStore

log = logging.getLogger(__name__)

FORMAT = 3  # bump when the layout, the decoding or the key changes (2: 8 bits per mode, EXIF; 3: content-hash keys)
INTERPOLATION = InterpolationMode.BILINEAR  # the on-the-fly path's transforms.Resize uses the same
FULL_CHECK_BYTES = 1 << 30
BLOCK, SAMPLED_BLOCKS = 1 << 20, 64
CHUNK = 32  # images per decoding task


@dataclass
class Store:
    images: torch.Tensor  # uint8 [N, C, S, S], memory-mapped (copy-on-write: never written back)
    path: Path
    key: str
    built: bool  # False: an existing store was reused
    undecodable: dict[str, str]  # path -> why, for the files whose pixels failed to decode (their rows are zero)


def store_key(hashes: list[str], image_size: int) -> str:
    """The store of files with these content hashes (sha256, in row order) at ``image_size``."""
    return digest(
        {
            "format": FORMAT,
            "files": hashes,
            "image_size": image_size,
            "channels": "1 if every image is grayscale else 3",
            "resize": f"PIL {INTERPOLATION.value}",
        }
    )


def decode(path: str, image_size: int, channels: int) -> np.ndarray:
    """One file as uint8 ``[channels, S, S]``, as the on-the-fly path sees it (channels=3: 8-bit
    RGB then resize; channels=1: the same image's single gray channel). Raises what PIL raises."""
    with Image.open(path) as im:
        im = to_8bit(im)
    gray = channels == 1 and im.mode == "L"
    pixels = np.array(
        TF.resize(im if gray else im.convert("RGB"), [image_size, image_size], interpolation=INTERPOLATION)
    )
    if gray:
        return pixels[None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[:channels])


def channels_needed(files: list[str], image_size: int) -> int:
    """1 if every image is grayscale (by its PIL mode, which costs a header read, or, for other
    modes, by decoding it and comparing its channels), else 3. Files that fail to open or decode
    do not count (the build records them)."""
    for path in files:
        try:
            with Image.open(path) as im:
                gray = im.mode in GRAY_MODES
            rgb = None if gray else decode(path, image_size, 3)
        except Exception:  # a truncated file: the build names it
            continue
        if rgb is not None and not ((rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()):
            return 3
    return 1


class _Decode(Dataset):
    def __init__(self, files: list[str], image_size: int, channels: int):
        self.files, self.image_size, self.channels = files, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        """(pixels, "") or (zeros, why it failed): one bad file must not stop the build."""
        try:
            return decode(self.files[i], self.image_size, self.channels), ""
        except Exception as exc:  # truncated JPEG/PNG and other decode errors
            return np.zeros((self.channels, self.image_size, self.image_size), np.uint8), f"{type(exc).__name__}: {exc}"


def _write(f, chunk: np.ndarray) -> None:
    f.write(memoryview(chunk).cast("B"))


def _checksum(f: BinaryIO, size: int) -> tuple[str, str]:
    """(sha256 hex digest, what it covers) of the open file ``f``: the whole file up to FULL_CHECK_BYTES,
    else sampled blocks."""
    if size <= FULL_CHECK_BYTES:
        return sha256_from_start(f), "whole file"
    h = hashlib.sha256()
    for i in range(SAMPLED_BLOCKS):
        f.seek(i * (size - BLOCK) // (SAMPLED_BLOCKS - 1))
        h.update(f.read(BLOCK))
    return h.hexdigest(), f"{SAMPLED_BLOCKS} evenly spaced {BLOCK >> 20} MiB blocks"


def _open(data: Path, header: Path, key: str) -> tuple[torch.Tensor | None, str | None, dict[str, str]]:
    """(images, None, undecodable files) for a store that passes every check; (None, what is
    wrong, {}) otherwise, the problem being None when there is simply no store yet."""
    images, problem, meta = _check(data, header, key)
    return images, problem, meta.get("undecodable", {}) if images is not None else {}


def _check(data: Path, header: Path, key: str) -> tuple[torch.Tensor | None, str | None, dict]:
    if not header.is_file():
        return None, "has no header (an unfinished build?)" if data.exists() else None, {}
    try:
        meta = json.loads(header.read_text())
        shape, expected = tuple(int(n) for n in meta["shape"]), meta["checksum"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"has an unreadable header ({type(exc).__name__}: {exc})", {}
    if meta.get("format") != FORMAT or meta.get("key") != key:
        return None, f"has a header for another store (format {meta.get('format')}, key {meta.get('key')})", {}
    if not data.is_file():
        return None, "has a header but no data file", {}
    size, want = data.stat().st_size, math.prod(shape)
    if size != want:
        return None, f"is {size:,} bytes where its header says {want:,} (truncated or damaged)", {}
    with open(data, "rb") as f:
        actual = _checksum(f, size)[0]
    if actual != expected:
        return None, "fails its sha256 check (damaged)", {}
    return torch.from_numpy(np.memmap(data, dtype=np.uint8, mode="c", shape=shape)), None, meta


def _unwritable(folder: Path, why: str) -> ConfigError:
    """The store's folder cannot be used (read-only, permissions): one line with the ways out."""
    fix = (
        f"cannot write the decoded-image store there ({why}); it lives in <cache.dir>/decoded, also with "
        "cache.enabled=false: choose a writable cache.dir=PATH or dataset.store_dir=PATH, or data.decode_cache=false"
    )
    return ConfigError("store_dir", str(folder), fix)  # placed under dataset. by the caller


def _warn_cannot_store(folder: Path, needed: int, why: str) -> None:
    free = shutil.disk_usage(folder).free if folder.is_dir() else 0
    log.warning(
        "decoded-image store not written in %s: %s (it needs %.1f MB, %.1f MB are free); decoding with PIL on the "
        "fly instead, every epoch (slower). Free some space or point cache.dir at another disk; "
        "data.decode_cache=false skips the store",
        folder,
        why,
        needed / 2**20,
        free / 2**20,
    )


def open_or_build(
    files: list[str],
    image_size: int,
    store_dir: str | os.PathLike,
    progress: bool = True,
    workers: int | None = None,
    hashes: list[str] | None = None,
) -> Store | None:
    """The store of ``files`` at ``image_size``: reused when a valid one exists, else built (one
    builder at a time per key). None when it cannot be written (disk full): decode on the fly.
    ``workers``: decoding processes (None: every core for large sets, none for small ones);
    ``hashes``: the files' content hashes when the caller has them (else from the store's index)."""
    hashes = HashIndex(store_dir).sha256(files) if hashes is None else hashes
    identity = [{"path": f, "sha256": h} for f, h in zip(files, hashes)]  # the header's file list
    key = store_key(hashes, image_size)
    # made private (or shared, cache.shared) by trust.check_cache_folders before any work; here as mkdir -p would
    entries = KeyedStore(store_dir, private=False)
    data, header = entries.path(key, ".u8"), entries.path(key, ".json")
    if not _usable(entries):
        return None
    with entries.locked(key):  # a wait on another run's build is said after a few seconds
        start = time.perf_counter()
        images, problem, undecodable = _open(data, header, key)
        if images is not None:
            _log_reused(data, images, time.perf_counter() - start)
            return Store(images, data, key, built=False, undecodable=_by_path(undecodable, files, hashes))
        if problem is not None:
            log.warning("decoded-image store %s %s; rebuilding it", data, problem)
        if not _build(files, identity, image_size, data, header, key, progress, workers):
            return None
        images, problem, undecodable = _open(data, header, key)
        if images is None:
            raise RuntimeError(f"the decoded-image store {data} just built {problem}")
        return Store(images, data, key, built=True, undecodable=_by_path(undecodable, files, hashes))


def _usable(entries: KeyedStore) -> bool:
    """The store's folder exists (made here if needed) and is writable; False after a warning when the disk
    is too full to make it; a one-line ConfigError when it cannot be used at all."""
    try:
        folder = entries.make()
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise _unwritable(entries.folder, exc.strerror or str(exc)) from None
        _warn_cannot_store(entries.folder, 0, f"cannot create the folder ({exc.strerror})")
        return False
    if not os.access(folder, os.W_OK):
        raise _unwritable(entries.folder, "not writable")
    return True


def _log_reused(data: Path, images: torch.Tensor, seconds: float) -> None:
    shape = "x".join(map(str, images.shape[1:]))
    log.info(
        "decoded-image store reused: %s (%d images, %s uint8, checked in %.1fs)", data, len(images), shape, seconds
    )


def _by_path(why_by_hash: dict[str, str], files: list[str], hashes: list[str]) -> dict[str, str]:
    """The header's undecodable contents (by hash: a reused store may have been built from other names) by path."""
    return {f: why_by_hash[h] for f, h in zip(files, hashes) if h in why_by_hash}


def _build(
    files: list[str],
    identity: list[dict],
    image_size: int,
    data: Path,
    header: Path,
    key: str,
    progress: bool,
    workers: int | None,
) -> bool:
    """Decode ``files`` into ``data`` + ``header`` (temp files, renamed; the header last). False
    (after a warning, with nothing left behind) when the disk is full."""
    start = time.perf_counter()
    channels = channels_needed(files, image_size)
    shape = (len(files), channels, image_size, image_size)
    needed = math.prod(shape)
    if shutil.disk_usage(data.parent).free < needed + (1 << 20):  # + headroom for the header
        _warn_cannot_store(data.parent, needed, "not enough free space")
        return False
    workers = _decoding_workers(len(files)) if workers is None else workers
    log.info(
        "decoding %d images once into %s (%s uint8, %.0f MB; later epochs, runs and sweep jobs reuse it)",
        len(files),
        data,
        "x".join(map(str, shape[1:])),
        needed / 2**20,
    )
    meta = {"format": FORMAT, "key": key, "shape": list(shape), "dtype": "uint8"}
    try:
        with writing(header) as header_file:  # opened first, renamed last: only then is the store valid
            with writing(data) as f:
                undecodable = _decode_into(f, files, identity, image_size, channels, workers, progress)
                checksum, covers = _checksum(f, needed)
            seconds = time.perf_counter() - start
            meta |= {"checksum": checksum, "checksum_covers": covers, "image_size": image_size,
                     "resize": f"PIL {INTERPOLATION.value}", "build_s": round(seconds, 2),
                     "files": identity, "undecodable": undecodable}  # fmt: skip
            header_file.write(json.dumps(meta).encode())
    except BaseException as exc:
        for path in (data, header):  # what was there before was damaged (or is the half of this build)
            path.unlink(missing_ok=True)
        if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
            raise
        _warn_cannot_store(data.parent, needed, f"the disk filled up while writing ({exc.strerror})")
        return False
    _log_built(data, len(files), seconds, workers)
    return True


def _decoding_workers(n_files: int) -> int:
    """Every core (up to 8) for a set large enough to pay for starting them, else none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores) if n_files >= 4 * CHUNK and cores > 1 else 0


def _decode_into(
    f: BinaryIO, files: list[str], identity: list[dict], image_size: int, channels: int, workers: int, progress: bool
) -> dict[str, str]:
    """Decode ``files`` in row order into the open file ``f``; the undecodable ones' reasons by content hash."""
    undecodable = {}
    loader = DataLoader(_Decode(files, image_size, channels), batch_size=CHUNK, num_workers=workers)
    bar = tqdm(
        total=len(files),
        desc="decoding images (once)",
        unit="img",
        leave=False,
        dynamic_ncols=True,
        disable=None if progress else True,  # None: drawn only on a terminal
    )
    with bar:
        for first, (pixels, errors) in zip(range(0, len(files), CHUNK), loader):
            _write(f, pixels.numpy())
            undecodable.update({identity[first + i]["sha256"]: why for i, why in enumerate(errors) if why})
            bar.update(len(pixels))
    f.flush()
    return undecodable


def _log_built(data: Path, n_files: int, seconds: float, workers: int) -> None:
    others = [p for p in data.parent.glob("*.u8") if p != data]
    others_mb = sum(p.stat().st_size for p in others) / 2**20
    log.info(
        "decoded-image store built: %s, %d images in %.1fs (%.0f images/s, %d decoding workers)%s",
        data,
        n_files,
        seconds,
        n_files / seconds,
        workers,
        f"; {data.parent} also holds {len(others)} other store(s), {others_mb:.0f} MB"
        " (other sizes or file lists, or files changed since): delete those no run needs"
        if others
        else "",
    )
