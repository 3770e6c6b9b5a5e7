"""One keyed store: a folder of entries named by a key, each built by one process at a time.

The teacher cache (:class:`distill_runner.io.cache.Cache`: one store per kind of artefact, each file checksummed by
its ``.sha256`` sidecar) and the decoded-image store (:mod:`distill_runner.data.decode_cache`: a memory-mapped
data file whose checksum is in its JSON header) are both this. Their folder is made private unless shared on
purpose (:func:`distill_runner.io.trust.make_folder`); a builder holds ``<name>.lock`` while it checks and builds an
entry, so parallel sweep jobs wait for it and then find the entry (a wait longer than a few seconds is said,
naming the holder: :func:`distill_runner.io.trust.hold_lock`); and every file is written whole through
:func:`distill_runner.io.storage.writing` (a ``mkstemp`` temp file renamed into place, never through a symlink).

Docs: docs/guide/sweeps-and-cache.md
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill_runner.io import trust


class KeyedStore:
    """The entries under ``folder``. ``private``: a folder made here is this user's alone (mode 0o700);
    else it is made as ``mkdir -p`` makes it (the umask decides; a shared cache)."""

    def __init__(self, folder: str | os.PathLike, private: bool = True):
        self.folder, self.private = Path(folder).expanduser(), private

    def path(self, key: str, suffix: str) -> Path:
        """The file of entry ``key`` with ``suffix`` (``.pt``, ``.model.pt``, ``.u8``, ``.json``)."""
        return self.folder / f"{key}{suffix}"

    def make(self) -> Path:
        """The folder, made when missing; an OSError (read-only, disk full, a file in its place) as raised."""
        folder = trust.make_folder(self.folder, private=self.private)
        if not folder.is_dir():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
        return folder

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold ``<folder>/<name>.lock`` (waiting for the process that holds it) for the block."""
        self.make()
        with trust.hold_lock(self.folder / f"{name}.lock"):
            yield
