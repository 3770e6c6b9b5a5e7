"""An unwritable or full output folder fails before any training, with one line naming the fix."""

import errno
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

from distill_runner.errors import StorageError
from distill_runner.io import storage
from distill_runner.runner import run

Usage = namedtuple("Usage", "total used free")


@pytest.mark.slow
def test_run_folder_under_a_file_fails_before_hydra_writes_anything(tmp_path):
    (tmp_path / "not_a_folder").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "distill_runner", f"hydra.run.dir={tmp_path / 'not_a_folder' / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert (
        line.startswith("distill-run: error: hydra.run.dir=")
        and "is a file, not a folder" in line
        and "hydra.run.dir=PATH" in line
    )


def test_full_disk_stops_the_run_before_training(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(
        storage.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20)
    )  # 1 MB free
    with pytest.raises(StorageError) as err:
        run(tiny_cfg(), tmp_path / "run")
    assert err.value.key == "hydra.run.dir" and "1 MB free" in str(err.value) and "needs about" in str(err.value)
    assert (
        not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "outputs" / "cache" / "teachers").exists()
    )


def test_disk_full_while_testing_the_folder_is_named(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.tempfile, "NamedTemporaryFile", full)
    with pytest.raises(StorageError, match="is full; free space or choose a writable folder: cache.dir=PATH"):
        storage.check_writable(tmp_path / "cache", "cache.dir")


def test_enough_room_passes(tmp_path):
    storage.check_writable(tmp_path / "new" / "folder", "hydra.run.dir")
    storage.check_free_space(tmp_path, 2**20, "hydra.run.dir", "checkpoints")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    assert shutil.disk_usage(tmp_path).free > 0
