"""Files a run writes: atomic writes with checksums, and the checks made before any work (an
unwritable or full output folder fails at once with one line naming the folder and the fix, not
hours later when a checkpoint is saved).

Every stored artefact (checkpoints, cache entries) is written by :func:`save_verified` and read by
:func:`load_verified`: a flipped byte is a :class:`DamagedFile`, never a wrong number.
Docs: docs/guide/resume-and-faults.md
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch

from distill_runner import distributed
from distill_runner.errors import StorageError
from distill_runner.io import trust
from distill_runner.io.trust import pid_alive

log = logging.getLogger(__name__)

MB = 2**20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space, over quota
HEADROOM_BYTES = 64 * MB  # logs, TensorBoard events, reports
TMP_SUFFIX = ".tmp"


class DamagedFile(Exception):
    """A stored file whose bytes are not the ones written (checksum mismatch), or that does not load."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason})")


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """Write to a temp file then rename, so a crash never leaves a half-written checkpoint."""
    _atomic_write(path, lambda f: torch.save(obj, _reopenable(f)), _tensor_bytes(obj))


def _reopenable(f: BinaryIO) -> str | BinaryIO:
    """/proc/self/fd/N: a path to the open file itself, not re-resolved in its folder (torch.save writes
    other bytes to a file object)."""
    fd_path = f"/proc/self/fd/{f.fileno()}"
    return fd_path if os.path.exists(fd_path) else f


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text written like :func:`atomic_save`: a reader sees the old file or the whole new one."""
    _atomic_write(path, lambda f: f.write(text.encode()), len(text.encode()))


# ------------------------------------------------------------------------------ verified files
# The checksum is a sidecar, ``<file>.sha256`` (the format of ``sha256sum``, so ``sha256sum -c`` checks
# it by hand), not a header: torch.load reads the file from byte 0 (a header would mean loading a copy
# held in memory, 2 GB for large teacher outputs), and a file without one is recognisably the previous
# version's, which must still load. The sidecar is written after the data, each atomically: a crash in
# between leaves the old checksum beside the new data, a mismatch (the file is rebuilt), never a wrong
# number.


def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_from_start(f)


def sha256_from_start(f: BinaryIO) -> str:
    """The sha256 of an open file's bytes, read from its start."""
    digest = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(4 * MB):
        digest.update(chunk)
    return digest.hexdigest()


def save_verified(obj: object, path: str | os.PathLike) -> None:
    """:func:`atomic_save` plus the sha256 of the written bytes in ``<path>.sha256``."""
    _write_verified(path, lambda f: torch.save(obj, _reopenable(f)), _tensor_bytes(obj))


def write_text_verified(path: str | os.PathLike, text: str) -> None:
    _write_verified(path, lambda f: f.write(text.encode()), len(text.encode()))


def _write_verified(path: str | os.PathLike, write: Callable[[BinaryIO], object], size: int) -> None:
    found = {}

    def write_and_hash(f: BinaryIO) -> None:
        write(f)
        f.flush()
        found["digest"] = sha256_from_start(f)  # of the bytes written, before they replace the old file

    _atomic_write(path, write_and_hash, size)
    if distributed.is_main():
        atomic_write_text(sidecar(path), f"{found['digest']}  {Path(path).name}\n")


_warned_unverified = False


def verify(path: str | os.PathLike) -> bool:
    """True: the file matches its checksum; False: it has none (written by the previous version,
    warned once per process). :class:`DamagedFile` on a mismatch or a missing file."""
    global _warned_unverified
    path = Path(path)
    if not path.is_file():
        raise DamagedFile(path, "missing")
    try:
        expected = sidecar(path).read_text().split()[0]
    except FileNotFoundError:
        if not _warned_unverified:
            log.warning("%s has no checksum (written before checksums existed): loaded unverified; "
                        "files written from now on are verified (this warning is shown once)", path)  # fmt: skip
            _warned_unverified = True
        return False
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        raise DamagedFile(path, f"unreadable checksum {sidecar(path).name}: {exc}") from None
    if sha256_of(path) != expected:
        raise DamagedFile(path, f"sha256 differs from {sidecar(path).name}")
    return True


def load_verified(path: str | os.PathLike) -> object:
    """``torch.load(path, weights_only=True)`` after :func:`verify`; a file that does not load is damaged too."""
    verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a checkpoint, or a pickle weights_only refuses
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedFile(path, f"does not load: {first}") from None


def read_text_verified(path: str | os.PathLike) -> str:
    verify(path)
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedFile(path, str(exc)) from None


def remove_verified(path: str | os.PathLike) -> None:
    for p in (Path(path), sidecar(path)):
        p.unlink(missing_ok=True)


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> None:
    """Make ``previous`` a copy of ``path`` (and its checksum) before ``path`` is overwritten. Each step
    is atomic and the checksum moves first, so at every instant ``path`` or ``previous`` is a whole,
    matching pair: a crash leaves at worst a mismatch, which resume skips."""
    if not distributed.is_main() or not Path(path).is_file():
        return
    digest = _digest_in(sidecar(path))
    if digest is None:  # ``path`` is unverified (the previous version's): so is ``previous``
        sidecar(previous).unlink(missing_ok=True)
    else:
        atomic_write_text(sidecar(previous), f"{digest}  {Path(previous).name}\n")
    link_or_copy(path, previous)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``dst`` becomes a hard link to ``src`` (no extra disk), or a copy where the file system has no
    links or they cross file systems; atomically, through a temp name. Safe to share: every writer
    here replaces a file by rename, never writes into it, so the other name keeps the old bytes."""
    src, dst = Path(src), Path(dst)
    if not distributed.is_main():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")  # random: os.link never reuses a name
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)  # a symlink at dst is replaced itself, its target never written
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES):
            raise write_failed(dst, exc, 0) from None
        with open(src, "rb") as source:
            _atomic_write(dst, lambda f: shutil.copyfileobj(source, f), src.stat().st_size)


def link_verified(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """:func:`link_or_copy` for a verified file: its checksum goes with it."""
    if not distributed.is_main():
        return
    link_or_copy(src, dst)
    digest = _digest_in(sidecar(src))
    if digest is None:
        sidecar(dst).unlink(missing_ok=True)  # unverified, as ``src`` is
    else:  # a sidecar of its own (not a link): it names ``dst``, so sha256sum -c works in that folder
        atomic_write_text(sidecar(dst), f"{digest}  {Path(dst).name}\n")


def _digest_in(checksum: Path) -> str | None:
    try:
        return checksum.read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return None


# ------------------------------------------------------------------------------ atomic writes


def open_temp(path: Path) -> tuple[BinaryIO, Path]:
    """A new, empty temp file beside ``path``, open for writing (``w+b``): a random name created with
    ``O_EXCL`` (:func:`tempfile.mkstemp`: never an existing file, never through a symlink planted at a
    name a writer would use), with the mode a plain ``open`` gives, and flock-ed until closed, which
    tells :func:`remove_stale_temps` that its writer is alive."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    f = os.fdopen(fd, "w+b")
    try:
        os.fchmod(fd, 0o666 & ~trust.UMASK)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        f.close()
        Path(name).unlink(missing_ok=True)
        raise
    return f, Path(name)


def _tensor_bytes(obj: object) -> int:
    """About what ``torch.save(obj)`` writes: the tensors' bytes (for the message of a full disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], size: int = 0) -> None:
    """``write(f)`` into :func:`writing`'s temp file; a failed write is one line (:func:`write_failed`)."""
    if not distributed.is_main():  # under torchrun rank 0 alone writes; the other ranks hold the same state
        return
    path = Path(path)
    try:
        with writing(path) as f:
            write(f)
    except OSError as exc:
        raise write_failed(path, exc, size) from None


@contextmanager
def writing(path: Path) -> Iterator[BinaryIO]:
    """A temp file beside ``path`` (:func:`open_temp`) that replaces ``path`` when the block ends (a symlink
    there is replaced, its target never written); on any exception, a full disk or Ctrl-C, it is removed and
    the exception passes on: nothing half-written is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f, tmp = open_temp(path)
    try:
        with f:
            yield f
            f.flush()
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_failed(path: Path, exc: OSError, size: int) -> StorageError:
    """One line for a write that failed: the folder, the bytes it needed, the fix."""
    folder = path.parent
    try:
        free = f"{shutil.disk_usage(existing_ancestor(folder)).free / MB:.0f} MB free"
    except OSError:
        free = "free space unknown"
    if exc.errno in DISK_FULL:
        what = f"the disk (or quota) holding it is full: writing {path.name} needs about {size / MB:.1f} MB"
    else:
        what = f"writing {path.name} failed ({exc.strerror or exc}), {size / MB:.1f} MB"
    fix = (f"{what}, {free}; free space there (what is written so far is kept), then run the "
           "same command with trainer.resume=true")  # fmt: skip
    return StorageError("folder", str(folder), fix)


_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # open_temp's names: .<name>.<mkstemp's 8 characters>.tmp
_OLD_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # the previous version's: .<name>.tmp<pid>
STALE_AFTER_S = 600  # a shared folder's temp may be a live writer's on another machine (no lock seen over NFS)


def remove_stale_temps(folder: str | os.PathLike, min_age_s: float = 0) -> list[Path]:
    """Remove the temp files that killed writers left under ``folder``: ours (this user's, named like
    :func:`open_temp`'s), plain files (a symlink is never followed), no longer flock-ed by a writer (or,
    the previous version's ``.<name>.tmp<pid>``, whose pid is dead) and untouched for ``min_age_s``."""
    removed, folder, now = [], Path(folder), time.time()
    if not folder.is_dir() or not distributed.is_main():
        return removed
    for parent, _, names in os.walk(folder):  # os.walk does not follow symlinked folders
        for path in (Path(parent) / n for n in names if _TMP.match(n) or _OLD_TMP.match(n)):
            try:
                info = os.lstat(path)
                ours = stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()  # never a link, nor another's
                if ours and now - info.st_mtime >= min_age_s and not _writer_alive(path):
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # another process cleaned it first
                pass
    if removed:
        log.info("removed %d temp file(s) left by killed writers under %s", len(removed), folder)
    return removed


def _writer_alive(path: Path) -> bool:
    """The temp file's writer holds its flock (:func:`open_temp`); a file we cannot test counts as alive."""
    old = _OLD_TMP.match(path.name)
    if old is not None:
        return pid_alive(int(old[1]))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:  # held (EWOULDBLOCK), or a file system without flock
        return True
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ checks before a run


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """``folder`` exists and takes a file, or can be created: test by writing one."""
    base = existing_ancestor(Path(folder))
    fix = f"choose a writable folder: {key}=PATH"
    if not base.is_dir():
        raise StorageError(key, str(folder), f"{base} is a file, not a folder; {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".distill-run-write-test"):
            pass
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError(key, str(folder), f"the disk holding {base} is full; free space or {fix}") from None
        raise StorageError(key, str(folder), f"cannot write in {base} ({exc.strerror or exc}); {fix}") from None


def check_free_space(folder: str | os.PathLike, needed_bytes: int, key: str, what: str) -> None:
    """At least ``needed_bytes`` + headroom free on the disk that holds ``folder``."""
    base = existing_ancestor(Path(folder))
    free = shutil.disk_usage(base).free
    if free < needed_bytes + HEADROOM_BYTES:
        raise StorageError(
            key,
            str(folder),
            f"{free / MB:.0f} MB free on the disk holding {base}, the run needs about "
            f"{(needed_bytes + HEADROOM_BYTES) / MB:.0f} MB ({what}); free space or choose another folder: {key}=PATH",
        )


def checkpoint_bytes(parameter_count: int) -> int:
    """Disk a trained model takes in a run, fp32: final weights, the best epoch's weights, and the
    resumable last checkpoint (weights and the optimizer's two AdamW moments) with its previous copy."""
    return parameter_count * 4 * (1 + 1 + 3 + 3)


def disk_of(folder: str | os.PathLike) -> int:
    return existing_ancestor(Path(folder)).stat().st_dev


def check_free_space_per_disk(needs: list[tuple[str | os.PathLike, str, int, str]]) -> None:
    """:func:`check_free_space` for ``(folder, key, bytes, what)`` needs, summed per disk: a run folder
    and a cache on one disk share its free space, so they are checked together, once."""
    disks: dict[int, list] = {}
    for folder, key, nbytes, what in needs:
        found = disks.setdefault(disk_of(folder), [folder, key, 0, []])
        found[2] += nbytes
        found[3].append(what)
    for folder, key, nbytes, whats in disks.values():
        check_free_space(folder, nbytes, key, "; ".join(whats))
