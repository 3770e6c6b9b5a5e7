"""Stored artefacts are verified (a flipped byte is never used), a full disk ends in one line with
nothing half-written left behind, and a sweep's jobs share one copy of a cached teacher."""

import errno
import logging
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner import runner
from distill_runner.build import build_data, build_teacher
from distill_runner.data.digits import digits
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import ConfigError, StorageError
from distill_runner.io import storage
from distill_runner.io.cache import Cache
from distill_runner.models.factories import count_parameters, tiny_cnn
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)


def flip_byte(path, at=0.5):
    """Flip one byte in the middle of the file: inside tensor data, where torch.load would not notice."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ verified files


def test_flipped_byte_is_a_damaged_file_and_a_file_of_before_loads_with_one_warning(tmp_path, caplog, monkeypatch):
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    storage.save_verified(state, tmp_path / "a.pt")
    assert storage.sidecar(tmp_path / "a.pt").read_text().endswith("  a.pt\n")  # sha256sum -c reads it
    assert torch.equal(storage.load_verified(tmp_path / "a.pt")["w"], state["w"])
    flip_byte(tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["w"].sum() != state["w"].sum()  # a wrong number
    with pytest.raises(storage.DamagedFile, match="sha256 differs"):
        storage.load_verified(tmp_path / "a.pt")
    monkeypatch.setattr(storage, "_warned_unverified", False)
    for name in ("old1.pt", "old2.pt"):  # the previous version wrote no checksum
        torch.save(state, tmp_path / name)
        with caplog.at_level("WARNING"):
            assert torch.equal(storage.load_verified(tmp_path / name)["w"], state["w"])
    assert caplog.text.count("has no checksum") == 1


@pytest.mark.slow
def test_damaged_cache_entries_of_every_kind_are_named_and_rebuilt(tmp_path, caplog):
    """Teacher weights, teacher outputs, an evaluation and the baseline, each with one flipped byte."""
    cfg = compose_config(TINY + [f"cache.dir={tmp_path / 'cache'}"])
    first = runner.run(cfg, tmp_path / "a")
    damaged = [
        *(tmp_path / "cache" / "teachers").glob("*.model.pt"),
        *(tmp_path / "cache" / "teacher_outputs").glob("*.pt"),
        *(tmp_path / "cache" / "evals").glob("*.pt"),
        *(tmp_path / "cache" / "baselines").glob("*[0-9a-f].pt"),  # the entry (info), not its weights
    ]
    assert len(damaged) == 5
    for path in damaged:
        flip_byte(path)
    with caplog.at_level("INFO"):
        second = runner.run(cfg, tmp_path / "b")
    for path in damaged:
        assert f"cache entry {path} is damaged (sha256 differs" in caplog.text
    assert "fine-tuning teacher" in caplog.text and "reusing teacher" not in caplog.text
    assert "training baseline" in caplog.text and "reusing the evaluation" not in caplog.text
    for role in ("teacher", "student", "baseline"):  # rebuilt: the same numbers as before the damage
        assert first.models[role].test_acc == second.models[role].test_acc


@pytest.mark.slow
def test_reused_teacher_is_a_hard_link_to_the_cached_weights(tmp_path):
    cfg = compose_config(TINY + [f"cache.dir={tmp_path / 'cache'}"])
    for name in ("a", "b"):
        runner.run(cfg, tmp_path / name)
    (weights,) = (tmp_path / "cache" / "teachers").glob("*.model.pt")
    inode = weights.stat().st_ino
    for name in ("a", "b"):
        linked = tmp_path / name / "checkpoints" / "teacher.pt"
        assert linked.stat().st_ino == inode
        assert set(storage.load_verified(linked)) == set(storage.load_verified(weights))
    assert weights.stat().st_nlink == 3
    # deleting the cache never breaks a run folder: the link keeps the bytes
    subprocess.run(["rm", "-rf", str(tmp_path / "cache")], check=True)
    assert storage.verify(tmp_path / "a" / "checkpoints" / "teacher.pt")


def test_link_falls_back_to_a_copy_across_file_systems(tmp_path, monkeypatch):
    storage.save_verified({"w": torch.ones(3)}, tmp_path / "src.pt")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(storage.os, "link", cross_device)
    storage.link_verified(tmp_path / "src.pt", tmp_path / "run" / "dst.pt")
    dst = tmp_path / "run" / "dst.pt"
    assert dst.stat().st_ino != (tmp_path / "src.pt").stat().st_ino and storage.verify(dst)
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_cache_entry_of_an_earlier_format_is_said_once_and_rebuilt(tmp_path, caplog):
    cache = Cache(tmp_path)
    path = cache.path("teachers", "k")
    path.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "info": {"epochs": 1}}, path)  # as an earlier version wrote it
    trained = []

    def train():
        trained.append(1)
        return {"w": torch.zeros(2)}, {"epochs": 2}

    with caplog.at_level(logging.INFO, logger="distill_runner.io.cache"):
        state, info, source = cache.fetch_model("teachers", "k", train)
    assert trained == [1] and torch.equal(state["w"], torch.zeros(2)) and info == {"epochs": 2}
    assert source.startswith("computed")
    said = [r.getMessage() for r in caplog.records if "earlier cache format" in r.getMessage()]
    assert len(said) == 1 and str(path) in said[0] and said[0].endswith("rebuilt")
    assert storage.verify(cache.weights_path("teachers", "k")) and storage.verify(path)
    assert torch.load(path, weights_only=True) == {"info": {"epochs": 2}}  # the new format replaced it
    state, _, source = cache.fetch_model("teachers", "k", train=lambda: pytest.fail("trained again"))
    assert source.startswith("reused") and torch.equal(state["w"], torch.zeros(2))


# ------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def data():
    return digits(image_size=16, batch_size=16, limit=64, crop_padding=2, hflip=True)


def fit(data, epochs, folder, resume=False):
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=10, hidden=8)
    stage = engine.Stage(
        "student", model, Recipe.cross_entropy(), epochs, partial(torch.optim.SGD, lr=0.05), engine.constant_lr
    )
    history = engine.fit(stage, data.train, data.val, CPU, FP32, checkpoint_dir=folder, progress=False, resume=resume)
    return model, history


def test_damaged_last_checkpoint_falls_back_on_the_previous_one(data, tmp_path, caplog):
    fit(data, 2, tmp_path / "killed")  # as if killed after epoch 2 of 3
    last = tmp_path / "killed" / "student_last.pt"
    assert torch.load(last.with_name("student_last.prev.pt"), weights_only=True)["epoch"] == 1
    flip_byte(last)
    with caplog.at_level("INFO"):
        resumed, history = fit(data, 3, tmp_path / "killed", resume=True)
    assert f"{last} is damaged" in caplog.text and "resuming after epoch 1/3" in caplog.text
    whole, whole_history = fit(data, 3, tmp_path / "whole")
    assert [h["loss/total"] for h in history] == pytest.approx([h["loss/total"] for h in whole_history], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))


@pytest.mark.parametrize("previous", ["damaged", "absent"])
def test_damaged_last_checkpoint_without_a_good_previous_one_stops_in_one_line(data, tmp_path, previous):
    fit(data, 2, tmp_path)
    last, prev = tmp_path / "student_last.pt", tmp_path / "student_last.prev.pt"
    flip_byte(last)
    flip_byte(prev) if previous == "damaged" else prev.unlink()
    with pytest.raises(ConfigError) as err:
        fit(data, 3, tmp_path, resume=True)
    message = str(err.value)
    assert "\n" not in message and err.value.key == "trainer.resume" and str(last) in message
    assert "delete" in message and "to train the stage again from its first epoch" in message


@pytest.mark.slow
def test_damaged_finished_stage_is_trained_again(fast, tmp_path, caplog):
    runner.run(compose_config([*fast, "trainer.epochs=2"]), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob("*.prev.pt")), "a finished stage keeps no previous-last copy"
    flip_byte(checkpoints / "student.pt")
    with caplog.at_level("INFO"):
        runner.run(compose_config([*fast, "trainer.epochs=2", "trainer.resume=auto"]), tmp_path / "run")
    assert "stage student: the finished stage's checkpoint is damaged" in caplog.text
    assert "stage student: finished before" not in caplog.text and "stage baseline: finished before" in caplog.text
    assert storage.verify(tmp_path / "run" / "checkpoints" / "student.pt")


@pytest.mark.slow
def test_run_folder_of_the_previous_version_resumes_with_one_warning(fast, tmp_path, caplog, monkeypatch):
    runner.run(compose_config(fast), tmp_path / "run")
    for checksum in (tmp_path / "run" / "checkpoints").glob("*.sha256"):  # as the previous version left it
        checksum.unlink()
    monkeypatch.setattr(storage, "_warned_unverified", False)
    with caplog.at_level("INFO"):
        runner.run(compose_config([*fast, "trainer.resume=auto"]), tmp_path / "run")
    assert caplog.text.count("has no checksum") == 1
    assert "stage student: finished before" in caplog.text and "stage baseline: finished before" in caplog.text


# ------------------------------------------------------------------------------ a full disk


def test_disk_full_mid_write_leaves_no_temp_file_and_gives_one_line(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "student_last.pt"
    storage.save_verified({"w": torch.zeros(10)}, path)
    real_save = torch.save

    def fills_the_disk(obj, f):
        real_save({"part": torch.zeros(100)}, f)  # some bytes reach the temp file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.torch, "save", fills_the_disk)
    with pytest.raises(StorageError) as err:
        storage.save_verified({"w": torch.ones(2**18)}, path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "checkpoints") in message
    assert "full" in message and "needs about 1.0 MB" in message and "free space there" in message
    assert sorted(p.name for p in path.parent.iterdir()) == ["student_last.pt", "student_last.pt.sha256"]
    monkeypatch.setattr(storage.torch, "save", real_save)
    assert torch.equal(storage.load_verified(path)["w"], torch.zeros(10))  # the previous checkpoint is intact


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_from_the_cli(fast, tmp_path):
    """The same through ``distill-run``: exit code 2, one line, no traceback."""
    script = (
        "import errno, sys, torch\n"
        "from distill_runner.io import storage\n"
        "from distill_runner.cli import main\n"
        "def full(obj, f):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "storage.torch.save = full\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *fast, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("distill-run: error: folder=") and "is full" in line
    assert not list((tmp_path / "run").rglob(".*.tmp*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_killed_writers_temp_files_are_removed_on_the_next_start(fast, tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        checkpoints = tmp_path / "run" / "checkpoints"
        checkpoints.mkdir(parents=True)
        dead_tmp, live_tmp = checkpoints / f".student_last.pt.tmp{_dead_pid()}", checkpoints / f".x.pt.tmp{live.pid}"
        for path in (dead_tmp, live_tmp):
            path.write_bytes(b"half a checkpoint")
        runner.run(compose_config(fast), tmp_path / "run")
        assert not dead_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()


def test_a_shared_cache_keeps_a_dead_pids_temp_file_until_it_is_old(tmp_path):
    """A pid dead here may be a live writer on another machine sharing the cache: only an old temp goes."""
    fresh, old = tmp_path / f".a.pt.tmp{_dead_pid()}", tmp_path / "kind" / f".b.pt.tmp{_dead_pid()}"
    old.parent.mkdir()
    for path in (fresh, old):
        path.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert storage.remove_stale_temps(tmp_path, min_age_s=storage.STALE_AFTER_S) == [old]
    assert fresh.exists()


def test_disk_estimate_counts_one_disk_once_with_best_and_previous_checkpoints(tiny_cfg, tmp_path, monkeypatch):
    checks = []
    monkeypatch.setattr(storage, "check_free_space", lambda *args: checks.append(args))

    class Checked(Exception):
        pass

    def stop(*args, **kwargs):
        raise Checked

    monkeypatch.setattr(runner, "train_teachers", stop)  # check_room has run by then
    cfg = tiny_cfg([f"cache.dir={tmp_path / 'cache'}"])
    with pytest.raises(Checked):
        runner.run(cfg, tmp_path / "run")
    ((folder, needed, key, what),) = checks
    assert key == "hydra.run.dir"  # the run folder and the cache share tmp_path's disk: one check
    assert folder == tmp_path / "run" and "checkpoints" in what and "cached teachers" in what
    assert storage.checkpoint_bytes(1) == 4 * (1 + 1 + 3 + 3)  # final, best, last and previous last (AdamW)
    data = build_data(cfg)
    teacher = count_parameters(build_teacher(cfg.teacher, "teacher", data, cfg.seed))
    assert needed >= storage.checkpoint_bytes(teacher) + 4 * teacher

    checks.clear()
    disks = iter(range(10))
    monkeypatch.setattr(storage, "disk_of", lambda folder: next(disks))  # each on its own disk
    with pytest.raises(Checked):
        runner.run(tiny_cfg([f"cache.dir={tmp_path / 'cache'}", "seed=1"]), tmp_path / "run2")
    assert [key for _, _, key, _ in checks] == ["hydra.run.dir", "cache.dir"]
