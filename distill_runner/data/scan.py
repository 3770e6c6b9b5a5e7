"""An ImageFolder on disk: where its splits are, which files are images, which of them are readable.

:class:`Layout` finds the splits of ``dataset.root`` and scans each: class folders (sorted, hidden
ones ignored) and the image files directly in them (by extension; hidden files and other files
are ignored with one INFO line). Image files in sub-folders of a class folder are not used: one
WARNING gives their count, the first few paths and the fix (move them up into the class folder,
or delete the sub-folder), so a nested ``rejected/`` or ``duplicates/`` folder never joins the
class silently.

:func:`unreadable` checks every file with PIL's ``Image.verify()`` (the header and, for PNG, the
chunk checksums, without decoding the pixels); :func:`drop_bad` skips the bad files with one
warning naming them (``on_bad_image=skip``) or refuses them in one line (``on_bad_image=error``).
It serves the files that pass the header check but fail to decode too (a truncated JPEG), which
only a full decode finds (the store build, or :func:`distill_runner.data.images.undecodable`).

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchvision import datasets

from distill_runner.data.bundle import check_classes, stratified_split
from distill_runner.data.prints import DataPrint, report_changes
from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MAX_LISTED = 10  # bad files named in one warning or error
NESTED_LISTED = 3  # files in sub-folders named in the warning
IMAGE_EXTENSIONS = (*datasets.folder.IMG_EXTENSIONS, ".gif")  # torchvision's, and GIF (its first frame)


class Layout:
    """Where the splits of ``root`` are, and the errors that show the expected tree."""

    def __init__(
        self, root: str | None, source: str | None, classes_hint: Sequence[str] | None, val_from_train: float | None
    ):
        self.source = source or "your own images: one sub-folder per class"
        self.classes_hint = list(classes_hint or ["<class_a>", "<class_b>"])
        self.display = root
        if root is None:
            self.fail("dataset=imagefolder needs dataset.root=PATH")
        self.root = Path(str(root)).expanduser()
        if not self.root.is_dir():
            self.fail(f"no such folder ({self.root.resolve()})")
        self.single = not (self.root / "train").is_dir()
        nested = [d.name for d in sorted(self.root.iterdir()) if (d / "train").is_dir()] if self.single else []
        if nested:  # e.g. the zip's outer folder: ROOT/chest_xray/train/...
            inner = f"{self.display}/{nested[0]}"
            self.fail(f"no train/ folder here, but {inner}/train/ exists: use dataset.root={inner}")
        if self.single:
            self.splits = ["all"]
        else:
            self.splits = ["train", "test"] + (["val"] if val_from_train is None else [])
            for split in self.splits:
                if not (self.root / split).is_dir():
                    hint = "; or set dataset.val_from_train=0.1 to carve val from train" if split == "val" else ""
                    self.fail(f"the {split}/ split is missing{hint}")

    def tree(self) -> str:
        classes = ",".join(self.classes_hint)
        lines = [f"  {self.display}/"] + [f"    {s}/{{{classes}}}/*.jpeg" for s in SPLITS]
        return "\n".join(lines)

    def fail(self, problem: str):
        raise ConfigError(
            "root",
            self.display,
            f"{problem}. Expected:\n{self.tree()}\n"
            f"(or a single folder of class sub-folders, split by dataset.test_fraction and dataset.val_from_train)\n"
            f"Data: {self.source}",
        )

    def folder(self, split: str) -> Path:
        return self.root if split == "all" else self.root / split

    def scan(self, split: str) -> tuple[list[str], list[tuple[str, int]]]:
        """Class folders (sorted, hidden ones ignored) and image files of one split folder."""
        folder = self.folder(split)
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith((".", "__")))
        for cls in classes:
            self.check_class_name(folder, cls)
        if not classes:
            self.fail(f"{folder} has no class folders")
        items, ignored, nested = [], 0, []
        for index, cls in enumerate(classes):
            found = 0
            for entry in sorted(os.scandir(folder / cls), key=lambda e: e.name):
                if entry.is_file() and _is_image(entry.name):
                    items.append((entry.path, index))
                    found += 1
                elif entry.is_dir() and not entry.name.startswith("."):
                    nested += _images_under(Path(entry.path))
                else:
                    ignored += 1
            if found == 0:
                raise ConfigError(
                    "root",
                    self.display,
                    f"class folder {folder / cls} is empty (no {'/'.join(IMAGE_EXTENSIONS)} files);"
                    " add images or remove that class folder from every split",
                )
        if ignored:
            log.info(
                "%s: ignored %d entries that are not image files (hidden files, other extensions)", folder, ignored
            )
        if nested:  # not used: a nested folder (rejected/, duplicates/) must not join its class silently
            shown = ", ".join(os.path.relpath(p, self.root) for p in nested[:NESTED_LISTED])
            log.warning(
                "%s: %d image file(s) in sub-folders of class folders are not used (only files directly in a class "
                "folder are): %s%s; to use them, move them up into their class folder, else delete those sub-folders",
                folder,
                len(nested),
                shown,
                ", ..." if len(nested) > NESTED_LISTED else "",
            )
        return classes, items

    def check_class_name(self, folder: Path, name: str) -> None:
        """A class name is written into reports, plots, TensorBoard and metrics.json: refuse, before any
        model is built, one that is not valid UTF-8 or holds a newline (or another control character)."""
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes arrive as surrogate escapes
            problem = "is not valid UTF-8"
        else:
            if not any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
                return
            problem = "holds a newline or another control character"
        shown = str(os.fsencode(folder / name))[2:-1]  # its bytes, escaped: one printable line
        raise ConfigError(
            "root",
            self.display,
            f"the class folder {shown} {problem}; class names go into reports and metrics.json: rename it "
            "(the same new name in every split), e.g. to plain letters, digits and _",
        )

    def scan_splits(self) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
        """The class folders (the same in every split, else an error) and each split's files."""
        scanned = {split: self.scan(split) for split in self.splits}
        classes = scanned[self.splits[0]][0]
        for split, (found, _) in scanned.items():
            if found != classes:
                missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
                raise ConfigError(
                    "root",
                    self.display,
                    f"class folders differ between splits: train has {classes}, {split} has {found}"
                    f" (missing in {split}: {missing or 'none'}; only in {split}: {extra or 'none'}); "
                    "every split needs the same class folders",
                )
        return classes, {split: items for split, (_, items) in scanned.items()}

    def describe(self, val_from_train: float | None, test_fraction: float, seed: int) -> str:
        if self.single:
            return (
                f"single folder {self.display}, split by test_fraction={test_fraction}, "
                f"val_from_train={val_from_train} (stratified, seed {seed})"
            )
        if val_from_train is None:
            return f"splits train/val/test from {self.display}"
        unused = f"; {self.root / 'val'}/ is not used" if (self.root / "val").is_dir() else ""
        val = f"val = {val_from_train:.0%} of train (stratified, seed {seed})"
        return f"splits train/test from {self.display}, {val}{unused}"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere under ``folder`` (sorted), hidden files and folders left out."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, n) for n in sorted(names) if _is_image(n)]
    return found


def carve_splits(
    samples: dict, classes: list[str], layout: Layout, val_from_train: float | None, test_fraction: float, seed: int
) -> dict:
    """train/val/test sample lists: carve test (single folder) and val (``val_from_train``) stratified."""

    def split(items, fraction, key):
        targets = np.array([t for _, t in items])
        problem = split_problem(targets, fraction, classes)
        if problem is None:
            try:
                take, rest = stratified_split(targets, [fraction], seed)
            except ValueError as exc:  # a case split_problem does not foresee: still one line
                problem = f"cannot split {len(items)} images of {len(set(targets))} classes stratified ({exc})"
        if problem is not None:
            source, carved = ("single folder", "test") if key == "test_fraction" else ("train split", "val")
            raise ConfigError(key, fraction, f"the {carved} split carved from the {source} {problem}")
        return [items[i] for i in rest], [items[i] for i in take]

    if layout.single:
        if not 0 < test_fraction < 1:
            raise ConfigError(
                "test_fraction", test_fraction, "a single folder needs a test fraction in (0, 1), e.g. 0.2"
            )
        if val_from_train is None:
            raise ConfigError(
                "val_from_train", None, "a single folder (no train/ sub-folder) needs a validation fraction, e.g. 0.1"
            )
        samples = dict(zip(("train", "test"), split(samples["all"], test_fraction, "test_fraction")))
    if val_from_train is not None:
        samples["train"], samples["val"] = split(samples["train"], val_from_train, "val_from_train")
    return {s: samples[s] for s in SPLITS}


def split_problem(targets: np.ndarray, fraction: float, classes: Sequence[str]) -> str | None:
    """Why a stratified split of ``targets`` taking ``fraction`` fails, in words naming the class and
    the fix (a larger fraction, or more images), or None when it works (what scikit-learn checks,
    without its wording): each class needs two images (one each side), and the carved part,
    floor(fraction * n) images, and the rest must each hold at least one image per class."""
    counts = np.bincount(targets, minlength=len(classes))
    n, k = len(targets), int((counts > 0).sum())
    index = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    smallest, fewest = classes[index], int(counts[index])
    if fewest < 2:
        return f"needs at least 2 images of every class, and class {smallest} has {fewest}: add images of it"
    take = math.floor(fraction * n)  # scikit-learn's size of the carved part
    missing = f"fewer than one per class ({k} classes), so a class (e.g. {smallest}, the smallest) would be missing"
    if take < k:
        least = math.ceil(100 * k / n) / 100
        return f"would hold {take} of {n} images, {missing}: use a larger fraction (at least {least}) or add images"
    if n - take < k:
        most = math.floor(100 * (n - k) / n) / 100
        return (
            f"would leave {n - take} of {n} images for the rest, {missing} there: use a smaller fraction "
            f"(at most {most}) or add images"
        )
    return None


def unreadable(samples: dict) -> dict[str, str]:
    """``{path: reason}`` for the files that fail PIL's ``verify()`` (header check, no decoding)."""
    from PIL import Image

    start, bad = time.perf_counter(), {}
    for items in samples.values():
        for path, _ in items:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as exc:  # UnidentifiedImageError, truncated or corrupt data, unreadable file
                bad[path] = f"{type(exc).__name__}: {exc}"
    n = sum(map(len, samples.values()))
    log.info("checked %d image files in %.1fs: %d unreadable", n, time.perf_counter() - start, len(bad))
    return bad


def drop_bad(samples: dict, bad: dict[str, str], on_bad_image: str, layout: Layout, problem: str) -> dict:
    """``samples`` without the ``bad`` files (path -> why): skipped with one warning that names them
    (``on_bad_image=skip``), or refused in one line (``error``). ``problem``: what is wrong with them."""
    present = {p for items in samples.values() for p, _ in items}
    bad = {p: why for p, why in bad.items() if p in present}
    if not bad:
        return samples
    listed = "; ".join(f"{os.path.relpath(p, layout.root)} ({why})" for p, why in list(bad.items())[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    if on_bad_image == "error":
        raise ConfigError(
            "on_bad_image",
            "error",
            f"{len(bad)} {problem} image file(s) in {layout.display}: {listed}{more}; "
            "remove or replace them, or set dataset.on_bad_image=skip to skip them with a warning",
        )
    log.warning("skipped %d %s image file(s) in %s: %s%s", len(bad), problem, layout.display, listed, more)
    return {s: [(p, t) for p, t in items if p not in bad] for s, items in samples.items()}


def check_folder_classes(samples: dict, classes: list[str], layout: Layout, on_bad_image: str) -> None:
    """Every split holds every class, and there are two or more (:func:`check_classes`), worded
    for a folder: what to add there."""
    counts = {s: np.bincount([t for _, t in items], minlength=len(classes)).tolist() for s, items in samples.items()}

    def fix(split: str, cls: str) -> str:
        source = layout.root if layout.single else layout.root / (split if split in layout.splits else "train")
        if on_bad_image == "skip":
            return f"add readable images to {source / cls} (or replace the unreadable ones named in the warning)"
        return f"add images to {source / cls}"

    check_classes(counts, classes, "root", layout.display, fix)


def folder_print(
    samples: dict, classes: list[str], layout: Layout, hashes: dict[str, str], store_dir, settings: tuple
) -> DataPrint:
    """The data print of an ImageFolder (per file, split by split: content hash, label, split). The label
    is the class folder the file was found in (a symlink counts where it is, not where it points).
    A change since the last run with the same root and ``settings`` (the split settings) is said in one line."""
    entries = tuple((hashes[p], classes[t], split) for split in SPLITS for p, t in samples[split])
    names = tuple(os.path.relpath(p, layout.root) for split in SPLITS for p, _ in samples[split])
    found = DataPrint(entries, names)
    report_changes(found, store_dir, f"{layout.root.resolve()} {settings}", f"dataset.root={layout.display}")
    return found
