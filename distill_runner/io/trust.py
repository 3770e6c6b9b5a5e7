"""Folders other processes share: the cache's folders are this user's alone (or shared on purpose,
``cache.shared=true``), and its locks say who holds them.

Why the owner and the mode matter: whoever can write a cache folder can plant an entry with a matching
checksum (a checksum proves integrity, not who wrote it), or a symlink where a file is about to be
written. So a cache folder owned by another user, or writable by group or others, is refused before
any work, unless ``cache.shared=true`` says that everyone who can write there is trusted. Folders made
here for a private cache are mode 0o700 whatever the umask.

Docs: docs/guide/sweeps-and-cache.md
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import pwd
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill_runner.errors import ConfigError
from distill_runner.spec import RunSpec, typed

log = logging.getLogger(__name__)

UMASK = os.umask(0o022)  # the umask, read the only way there is (set, then restored), once at import
os.umask(UMASK)
WAIT_NOTICE_S = 5.0  # a lock not acquired within this is said once, then waited for
CACHE_KINDS = ("teachers", "baselines", "teacher_outputs", "evals", "speeds")  # cache.dir/<kind>/ (cache.Cache)


def check_cache_folders(spec: RunSpec) -> None:
    """Before any work, the data included: ``cache.dir`` (made private when new), each of its kinds' folders
    that exists, and the decoded-image store's folder (``dataset.store_dir``, used whether or not the
    cache is enabled) can be trusted (:func:`check_folder`), or one line naming the folder and the fix."""
    spec = typed(spec)
    cache, dataset = spec.cache, spec.dataset
    store = dataset.store_dir if dataset.decode_cache else None
    check_folders(cache.dir if cache.enabled else None, cache.shared, store)


def check_folders(cache_dir: str | None, shared: bool, store_dir: str | None) -> None:
    """:func:`check_cache_folders` of these folders (None: not used), also before the config is validated (the
    Hydra callback that checks the output folders)."""
    if cache_dir is not None:
        root = Path(cache_dir)
        try:
            root = make_folder(root, private=not shared)
        except OSError as exc:
            fix = f"cannot be made ({exc.strerror}); choose a writable folder: cache.dir=PATH"
            raise _refused("cache.dir", root, fix) from None
        for folder in (root, *(root / kind for kind in CACHE_KINDS)):
            check_folder(folder, "cache.dir", shared)
    if store_dir is not None:
        try:
            make_folder(store_dir, private=not shared)
        except OSError:  # unwritable or full: the store says so in its own words (and may fall back)
            return
        check_folder(store_dir, "dataset.store_dir", shared)


def make_folder(folder: str | os.PathLike, private: bool) -> Path:
    """``mkdir -p folder``. With ``private``, ``folder`` itself, when made here, is mode 0o700 and each
    folder made above it is not writable by group or others (chmod after mkdir: the umask cannot widen
    either). Folders that already exist are left as they are: :func:`check_folder` judges them."""
    folder = Path(folder).expanduser().absolute()
    missing = []
    path = folder
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # another process made it meanwhile: checked like any existing folder
            continue
        if private:
            os.chmod(path, 0o700 if path == folder else 0o755 & ~UMASK)
        else:
            os.chmod(path, 0o777 & ~UMASK)
    return folder


def check_folder(folder: str | os.PathLike, key: str, shared: bool) -> None:
    """An existing cache folder can be trusted, or a one-line :class:`ConfigError` under ``key`` naming it
    and the fix: a folder (or a symlink to one that is this user's own link), owned by this user and not
    writable by group or others (both unchecked with ``shared``), and writable by this process."""
    folder = Path(folder).expanduser().absolute()
    uid = os.getuid()
    shared_fix = "or set cache.shared=true if everyone who can write there is trusted"
    try:
        info = os.lstat(folder)
        if stat.S_ISLNK(info.st_mode) and info.st_uid != uid and not shared:
            raise _refused(key, folder, f"is a symlink made by another user (uid {info.st_uid}); "
                           f"delete it or choose another folder ({key}=PATH), {shared_fix}")  # fmt: skip
        info = os.stat(folder)
    except FileNotFoundError:
        return  # made private when first used
    if not stat.S_ISDIR(info.st_mode):
        raise _refused(key, folder, f"is not a folder; remove it or choose another folder: {key}=PATH")
    if not shared and info.st_uid != uid:
        raise _refused(key, folder, f"is owned by another user (uid {info.st_uid}), who could replace what it "
                       f"holds; choose a folder of your own ({key}=PATH), {shared_fix}")  # fmt: skip
    writers = stat.S_IWOTH | (0 if _private_group(info.st_gid) else stat.S_IWGRP)
    if not shared and info.st_mode & writers:
        mode = oct(stat.S_IMODE(info.st_mode))
        raise _refused(key, folder, f"is writable by group or others (mode {mode}), who could replace what it "
                       f"holds; make it private (chmod go-w {folder}), {shared_fix}")  # fmt: skip
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _refused(key, folder, "is not writable by you (read-only); make it writable "
                       f"(chmod u+w {folder}) or choose another folder: {key}=PATH")  # fmt: skip


def _private_group(gid: int) -> bool:
    """``gid`` is this user's private group (named after the user, no other member: the default of
    Debian/Ubuntu accounts, whose umask 002 makes folders group-writable): its write bit lets no one else in."""
    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    return gid == os.getgid() and group.gr_name == user and set(group.gr_mem) <= {user}


def _refused(key: str, folder: Path, why: str) -> ConfigError:
    return ConfigError(key, str(folder), why)


@contextmanager
def hold_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (flock; created if absent, never through a symlink) for the
    block. A wait longer than :data:`WAIT_NOTICE_S` is said once, naming the holder's pid (recorded in
    the lock file by its holder), then the wait goes on. Compatible with :mod:`filelock` (also flock)."""
    path = Path(path)
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o666)
    except PermissionError:  # another user's lock file in a shared cache: flock needs no write access
        fd = os.open(path, os.O_RDONLY | flags, 0o666)
    try:
        if not _lock_within(fd, WAIT_NOTICE_S):
            log.warning("waiting for %s held by another run%s...", path, _holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        _record_holder(fd)
        yield
    finally:
        _record_holder(fd, clear=True)
        os.close(fd)  # releases the lock


def _lock_within(fd: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _holder(fd: int) -> str:
    """`` (pid N)``, `` (pid N on HOST)``, or nothing when the holder recorded none (an older version)."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if host == socket.gethostname() else f" (pid {pid} on {host})"


def _record_holder(fd: int, clear: bool = False) -> None:
    try:
        os.ftruncate(fd, 0)
        if not clear:
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as exc:  # opened read-only (another user's lock file): the holder stays unnamed
        if exc.errno not in (errno.EBADF, errno.EINVAL, errno.EACCES):
            raise


def pid_alive(pid: int) -> bool:
    """A process with this pid runs on this machine (ours included; another user's counts)."""
    try:
        os.kill(pid, 0)  # signal 0 only asks whether it exists (our own pid does)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
