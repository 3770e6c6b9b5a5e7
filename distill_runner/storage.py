"""Files a run writes: atomic writes, and the checks made before
any work (an unwritable or full output folder fails at once with one line naming the folder and
the fix, not hours later when a checkpoint is saved)."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distill_runner import distributed
from distill_runner.errors import ConfigError

MB = 2**20
HEADROOM_BYTES = 64 * MB  # logs, TensorBoard events, reports


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """Write to a temp file then rename, so a crash never leaves a half-written checkpoint."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text written like :func:`atomic_save`: a reader sees the old file or the whole new one."""
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    if not distributed.is_main():  # under torchrun rank 0 alone writes; the other ranks hold the same state
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


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
        raise ConfigError(key, str(folder), f"{base} is a file, not a folder; {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".distill-run-write-test"):
            pass
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ConfigError(key, str(folder), f"the disk holding {base} is full; free space or {fix}") from None
        raise ConfigError(key, str(folder), f"cannot write in {base} ({exc.strerror or exc}); {fix}") from None


def check_free_space(folder: str | os.PathLike, needed_bytes: int, key: str, what: str) -> None:
    """At least ``needed_bytes`` + headroom free on the disk that holds ``folder``."""
    base = existing_ancestor(Path(folder))
    free = shutil.disk_usage(base).free
    if free < needed_bytes + HEADROOM_BYTES:
        raise ConfigError(
            key,
            str(folder),
            f"{free / MB:.0f} MB free on the disk holding {base}, the run needs about "
            f"{(needed_bytes + HEADROOM_BYTES) / MB:.0f} MB ({what}); free space or choose another folder: {key}=PATH",
        )


def checkpoint_bytes(parameter_count: int) -> int:
    """Disk a trained model takes in a run: final weights + the resumable last checkpoint (weights
    and the optimizer's two AdamW moments), fp32."""
    return parameter_count * 4 * (1 + 3)


class OutputFolderCheck(Callback):
    """Before Hydra creates the run (or sweep) folder: it must be writable, and so must the cache."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    def _check(self, config: DictConfig, key: str) -> None:
        try:
            check_writable(OmegaConf.select(config, key), key)
            if OmegaConf.select(config, "cache.enabled", default=False):
                check_writable(OmegaConf.select(config, "cache.dir"), "cache.dir")
        except ConfigError as exc:  # Hydra would print a traceback: one line instead
            print(f"distill-run: error: {exc}", file=sys.stderr)
            sys.exit(2)
