"""Data prints see every change a red team made that paths, sizes and mtimes miss: test files swapped between
class folders with sizes and whole-second mtimes kept (``tar x``), a ``cp -p``-style copy over a file, symlinks
moved between class folders of a pool; an unchanged tree costs a stat per file; a damaged index is not trusted."""

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_IMAGES, compose_config
from fake_data import make_cifar, make_xray_folder, skip_cifar_md5
from PIL import Image

from distill_runner import runner
from distill_runner.data import prints
from distill_runner.data.cifar import cifar
from distill_runner.data.imagefolder import imagefolder
from distill_runner.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_racy_window(monkeypatch):
    """Files made a moment ago are hashed again on every call (their ctime is recent); these tests make them
    and reuse the index at once, so they mark every file old enough to be kept."""
    monkeypatch.setattr(prints, "RACY_NS", -(10**18))


def whole_second_mtimes(paths) -> None:
    for p in paths:
        t = int(os.stat(p).st_mtime)
        os.utime(p, (t, t))


def same_size(paths) -> None:
    """Pad JPEGs to one size (bytes after the end marker are ignored by decoders): a swap keeps every size."""
    size = max(os.stat(p).st_size for p in paths)
    for p in paths:
        Path(p).write_bytes(Path(p).read_bytes().ljust(size, b"\0"))


def swap(a: Path, b: Path) -> None:
    """Exchange two files' bytes, keeping each path's size and (whole-second) mtime, as a tar x would."""
    times = {p: os.stat(p).st_mtime for p in (a, b)}
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for p, t in times.items():
        os.utime(p, (t, t))


def test_the_index_hashes_once_and_sees_swaps_copies_and_damage(tmp_path, monkeypatch, caplog):
    files = [tmp_path / f"{i}.bin" for i in range(4)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
    whole_second_mtimes(files)
    paths = [str(f) for f in files]
    index = prints.HashIndex(tmp_path / "store")
    first = index.sha256(paths)
    reads = []
    real = prints.sha256_of
    monkeypatch.setattr(prints, "sha256_of", lambda p: reads.append(p) or real(p))
    assert index.sha256(paths) == first and reads == []  # unchanged: a stat each, no read
    swap(files[0], files[1])
    shutil.copy2(files[3], files[2])  # cp -p: the bytes of 3, its mtime and size
    after = index.sha256(paths)
    assert after == [first[1], first[0], first[3], first[3]] and len(reads) == 3
    index_file = tmp_path / "store" / prints.PRINTS_DIR / prints.INDEX_NAME
    index_file.write_text(index_file.read_text().replace(first[3], "0" * 64))  # checksum no longer matches
    with caplog.at_level(logging.WARNING):
        assert index.sha256(paths) == after
    assert "unreadable or damaged" in caplog.text and len(reads) == 7
    prints.sidecar(index_file).unlink()  # an index without its checksum (planted, or half-copied) is not trusted
    assert index.sha256(paths) == after and len(reads) == 11


def xray_tree(root: Path) -> Path:
    make_xray_folder(root)
    jpegs = sorted(str(p) for p in root.rglob("*.jpeg"))
    same_size(jpegs)
    whole_second_mtimes(jpegs)
    return root


def load(root, store, **kw):
    return imagefolder(root=str(root), image_size=16, num_workers=0, store_dir=str(store), progress=False, **kw)


def test_swapped_or_copied_test_files_change_the_print(tmp_path, caplog):
    root = xray_tree(tmp_path / "xray")
    before = load(root, tmp_path / "store")
    normal, pneumonia = (sorted((root / "test" / c).glob("*.jpeg")) for c in ("NORMAL", "PNEUMONIA"))
    swap(normal[0], pneumonia[0])
    with caplog.at_level(logging.INFO):
        after = load(root, tmp_path / "store")
    # the same images under other names: the store (rows by content) is reused, the labels are not
    assert after.fingerprint != before.fingerprint and "decoded-image store reused" in caplog.text
    assert after.class_counts == before.class_counts
    (line,) = [r.getMessage() for r in caplog.records if "changed since the last run" in r.getMessage()]
    assert "2 files' content, 2 labels" in line and "rebuilding" in line
    shutil.copy2(normal[1], normal[2])  # cp -p over a file of the same class: another image set
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert load(root, tmp_path / "store").fingerprint != after.fingerprint
    assert "decoding 32 images once" in caplog.text
    again = load(root, tmp_path / "store", decode_cache=False)  # the PIL path sees the same print
    assert again.fingerprint == load(root, tmp_path / "store").fingerprint


def test_a_symlink_moved_between_class_folders_changes_the_print(tmp_path, caplog):
    pool = xray_tree(tmp_path / "pool")
    root = tmp_path / "linked"
    for src in pool.rglob("*"):  # the same tree, every image a symlink into the pool
        dst = root / src.relative_to(pool)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.symlink_to(src)
    before = load(root, tmp_path / "store")
    link = sorted((root / "test" / "NORMAL").glob("*.jpeg"))[0]
    moved = root / "test" / "PNEUMONIA" / link.name
    moved.symlink_to(os.readlink(link))
    link.unlink()
    with caplog.at_level(logging.INFO):
        after = load(root, tmp_path / "store")
    assert after.fingerprint != before.fingerprint and after.class_counts["test"] == [2, 4]
    assert "1 label, 1 added, 1 removed" in caplog.text and "decoded-image store reused" in caplog.text


def test_cifar_print_holds_the_batch_files_content(tmp_path, monkeypatch):
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path, per_class=2)
    first = cifar(root=str(tmp_path), download=False, val_from_train=0.5).fingerprint
    assert first is not None and cifar(root=str(tmp_path), download=False, val_from_train=0.5).fingerprint == first
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = bytearray(batch.read_bytes())
    data[-20] ^= 1  # a pixel byte: same size, same mtime
    t = os.stat(batch).st_mtime_ns
    batch.write_bytes(bytes(data))
    os.utime(batch, ns=(t, t))
    assert cifar(root=str(tmp_path), download=False, val_from_train=0.5).fingerprint != first


def tiny_xray(root, *extra):
    overrides = [*TINY_IMAGES, "dataset.image_size=16", "teacher=wide_cnn", "teacher.weights=null"]
    return compose_config([*overrides, f"dataset.root={root}", "dataset.num_workers=0", *extra], "xray_kd")


@pytest.mark.slow
def test_a_run_after_swapping_every_test_label_reports_the_true_accuracy(tmp_path, caplog):
    """The red team's case end to end: test images swapped between the class folders (sizes and whole-second
    mtimes kept). The cached teacher, baseline and their evaluations must not be reused: every label flipped, so
    the true accuracy of the same (retrained, deterministic) models is 1 - the first run's."""
    root = xray_tree(tmp_path / "xray")
    first = runner.run(tiny_xray(root), tmp_path / "a")
    normal, pneumonia = (sorted((root / "test" / c).glob("*.jpeg")) for c in ("NORMAL", "PNEUMONIA"))
    for a, b in zip(normal, pneumonia):
        swap(a, b)
    with caplog.at_level(logging.INFO):
        second = runner.run(tiny_xray(root), tmp_path / "b")
    # no cached teacher, baseline or evaluation ("reusing the evaluation of ...") of the old labels
    assert "reusing" not in caplog.text and "computed and stored in outputs/cache/teacher_outputs" in caplog.text
    assert "6 files' content, 6 labels" in caplog.text
    for role in ("teacher", "baseline"):
        assert second.models[role].test_acc == pytest.approx(1 - first.models[role].test_acc)


@pytest.mark.parametrize("name", [b"caf\xe9", b"two\nlines"])
def test_a_class_folder_named_with_bad_bytes_or_a_newline_is_refused_at_scan(tmp_path, name):
    root = make_xray_folder(tmp_path / "xray")
    for split in ("train", "val", "test"):
        folder = os.path.join(os.fsencode(root / split), name)
        os.mkdir(folder)
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(os.fsdecode(os.path.join(folder, b"a.png")))
    with pytest.raises(ConfigError) as caught:
        load(root, tmp_path / "store")
    message = str(caught.value)
    assert "\n" not in message.split("Expected")[0] and "rename it" in message
    assert repr(name)[2:-1] in message and not (tmp_path / "store").exists()  # nothing built
