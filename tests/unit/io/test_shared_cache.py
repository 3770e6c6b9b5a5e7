"""A cache another local user can reach: temp files never write through a planted symlink, cache folders
are private, a folder another user owns or can write is refused before any work (unless cache.shared),
and a run waiting on another run's lock says so."""

import os
import re
import stat
import subprocess
import sys
import threading

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner import runner
from distill_runner.errors import ConfigError
from distill_runner.io import storage, trust
from distill_runner.io.cache import Cache

ROOT = os.getuid() == 0
NOBODY = 65534


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("the victim's own file")
    victim.chmod(0o600)
    return victim


def _intact(victim):
    return victim.read_text() == "the victim's own file" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_planted_symlinks_at_the_old_temp_name_and_at_the_destination_never_write_the_victims_file(tmp_path):
    victim, folder = _victim(tmp_path), tmp_path / "cache" / "teachers"
    folder.mkdir(parents=True)
    target = folder / "abc.model.pt"
    old_temps = [f".{target.name}.tmp{os.getpid()}", f".{target.name}.sha256.tmp{os.getpid()}"]
    for name in (*old_temps, target.name, f"{target.name}.sha256"):
        (folder / name).symlink_to(victim)  # the names the previous version wrote through, and the destinations
    storage.save_verified({"w": torch.ones(3)}, target)
    assert _intact(victim)
    assert not target.is_symlink() and not storage.sidecar(target).is_symlink()  # the links were replaced
    assert torch.equal(storage.load_verified(target)["w"], torch.ones(3))
    link = tmp_path / "run" / "checkpoints" / "teacher.pt"
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    storage.link_verified(target, link)  # a run folder's hard link to the cache entry
    assert _intact(victim) and os.path.samefile(link, target)


def test_temp_files_are_made_by_mkstemp_with_random_names_not_the_pid(tmp_path, monkeypatch):
    made = []
    real = storage.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(storage.tempfile, "mkstemp", spy)
    storage.atomic_write_text(tmp_path / "a.txt", "x")
    storage.atomic_write_text(tmp_path / "a.txt", "y")
    assert len(made) == 2 and made[0] != made[1]
    assert all(storage._TMP.match(os.path.basename(m)) and f"tmp{os.getpid()}" not in m for m in made)
    assert (tmp_path / "a.txt").read_text() == "y" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_stale_temp_removal_spares_live_writers_symlinks_and_other_users_files(tmp_path):
    victim = _victim(tmp_path)
    folder = tmp_path / "cache"
    folder.mkdir()
    live_file, live = storage.open_temp(folder / "live.pt")  # its writer holds it (flock)
    dead_file, dead = storage.open_temp(folder / "dead.pt")
    dead_file.close()  # its writer is gone
    planted = folder / ".x.pt.abcdefgh.tmp"
    planted.symlink_to(victim)
    try:
        assert storage.remove_stale_temps(folder) == [dead]
        assert live.exists() and planted.is_symlink() and _intact(victim)
    finally:
        live_file.close()
    if ROOT:  # a dead temp of another user (in a shared cache) is not ours to delete
        os.chown(live, NOBODY, NOBODY)
        assert storage.remove_stale_temps(folder) == [] and live.exists()


def test_new_cache_folders_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        root = trust.make_folder(tmp_path / "a" / "cache", private=True)
        with Cache(root).locked("teachers", "k"):
            pass
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(root) == 0o700 and mode(root / "teachers") == 0o700
    assert not mode(tmp_path / "a") & 0o022  # a folder made above it: not writable by group/others either


def _cfg(cache_dir, *extra):
    return compose_config([*TINY, f"cache.dir={cache_dir}", *extra])


def test_a_group_or_other_writable_cache_is_refused_before_any_work_unless_shared(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(ConfigError) as err:
        runner.run(_cfg(cache), tmp_path / "run")
    message = str(err.value)
    assert err.value.key == "cache.dir" and str(cache) in message and "\n" not in message
    assert "writable by group or others (mode 0o777)" in message and f"chmod go-w {cache}" in message
    assert "cache.shared=true" in message and not (tmp_path / "run" / "checkpoints").exists()
    trust.check_cache_folders(_cfg(cache, "cache.shared=true"))  # shared on purpose: trusted
    teachers = cache / "teachers"
    cache.chmod(0o700)
    teachers.mkdir(mode=0o700)
    teachers.chmod(0o707)  # a sub-folder is judged too
    with pytest.raises(ConfigError, match=re.escape(f"cache.dir={str(teachers)!r}: is writable by group or others")):
        trust.check_cache_folders(_cfg(cache))


@pytest.mark.skipif(not ROOT, reason="chgrp to another group needs root")
def test_group_write_is_refused_unless_the_group_is_the_users_private_one(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o770)
    trust.check_cache_folders(_cfg(cache))  # group root: root's private group (umask 002 accounts make these)
    os.chown(cache, -1, NOBODY)  # nogroup: not the user's own
    with pytest.raises(ConfigError, match="is writable by group or others \\(mode 0o770\\)"):
        trust.check_cache_folders(_cfg(cache))


@pytest.mark.slow
@pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
def test_a_cache_folder_owned_by_another_user_is_one_line_from_the_cli(tmp_path):
    cache = tmp_path / "cache"
    (cache / "evals").mkdir(parents=True, mode=0o700)
    os.chown(cache / "evals", NOBODY, NOBODY)  # found before training, not at its lock after all stages
    proc = subprocess.run(
        [sys.executable, "-m", "distill_runner", *TINY, f"cache.dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    evals = str(cache / "evals")
    assert line.startswith(f"distill-run: error: cache.dir={evals!r}: is owned by another user (uid 65534)")
    assert "cache.shared=true" in line and not (tmp_path / "run").exists()
    os.chown(cache / "evals", os.getuid(), os.getgid())
    os.chown(cache, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="is owned by another user"):
        trust.check_cache_folders(_cfg(cache))
    trust.check_cache_folders(_cfg(cache, "cache.shared=true"))


def test_a_read_only_cache_sub_folder_is_named_before_any_work(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "baselines").mkdir(parents=True, mode=0o700)
    (cache / "baselines").chmod(0o500)
    if ROOT:  # root writes anywhere: make the check see what any other user sees
        real = os.access
        monkeypatch.setattr(trust.os, "access", lambda p, m: real(p, m) and os.fspath(p) != str(cache / "baselines"))
    with pytest.raises(ConfigError) as err:
        runner.run(_cfg(cache), tmp_path / "run")
    assert f"cache.dir={str(cache / 'baselines')!r}: is not writable by you" in str(err.value)
    assert f"chmod u+w {cache / 'baselines'}" in str(err.value)


def test_a_decoded_store_folder_is_judged_like_the_cache(tmp_path):
    store = tmp_path / "decoded"
    store.mkdir()
    store.chmod(0o757)
    cfg = compose_config(["dataset=imagefolder", "dataset.root=x", "cache.enabled=false", f"dataset.store_dir={store}"])
    with pytest.raises(ConfigError, match=re.escape(f"dataset.store_dir={str(store)!r}: is writable by group")):
        trust.check_cache_folders(cfg)


WAIT_HOLDER = """
import sys, time
from distill_runner.io.trust import hold_lock
with hold_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_waiting_on_a_lock_another_run_holds_is_said_with_its_pid(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trust, "WAIT_NOTICE_S", 0.3)
    cache = Cache(tmp_path / "cache")
    lock = str(cache.path("teachers", "k")) + ".lock"
    (tmp_path / "cache" / "teachers").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", WAIT_HOLDER, lock, "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = threading.Event()

        def wait() -> None:
            with cache.locked("teachers", "k"):
                done.set()

        waiter = threading.Thread(target=wait, daemon=True)
        with caplog.at_level("WARNING", logger="distill_runner.io.trust"):
            waiter.start()
            waiter.join(timeout=30)
        assert done.is_set()
    finally:
        holder.kill()
        holder.wait()
    (line,) = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert line == f"waiting for {lock} held by another run (pid {holder.pid})..."


@pytest.mark.slow
def test_a_run_into_a_shared_cache_with_planted_symlinks_at_its_entries_leaves_the_victims_file(tmp_path):
    """The red-team case end to end: another user links the names a run will write to the victim's file."""
    victim, cache = _victim(tmp_path), tmp_path / "cache"
    runner.run(_cfg(cache), tmp_path / "first")  # learns the entries' names
    entries = [p for kind in ("teachers", "baselines") for p in (cache / kind).iterdir() if p.suffix != ".lock"]
    assert any(p.name.endswith(".model.pt") for p in entries)
    for path in entries:
        path.unlink()
        path.symlink_to(victim)
    cache.chmod(0o777)
    runner.run(_cfg(cache, "cache.shared=true"), tmp_path / "second")  # trains and stores them again
    assert _intact(victim) and not any(p.is_symlink() for p in entries)
    assert all(storage.verify(p) for p in entries if p.suffix == ".pt")
