"""Data prints: what every data-derived cache key holds, and the content hashes they are made of.

A data set's print lists, for every file a run uses, in order: the sha256 of its content, its label
and its split. Every artefact derived from the data (the decoded-image store, fine-tuned teachers,
scratch baselines, replayable teacher outputs, evaluations) is keyed by the print's digest, so a file
whose bytes change, that moves to another class folder (or a symlink moved between class folders)
or to another split gives other keys, whatever its path, size and modification time say.

Hashing every file on every run would read the whole data set; :class:`HashIndex` keeps each file's
hash in ``<folder>/prints/content-hashes.json`` (beside the decoded-image store) under its inode, with its
size, ``mtime_ns`` and ``ctime_ns``. A hash is reused only while all of them still match, so an
unchanged tree costs one ``stat`` per file. Users can set a file's mtime (``cp -p``, ``rsync -a``,
``tar x``, ``os.utime``) but not its ctime, which every write, rename and ``chmod`` sets to now; a
file swapped in by ``mv`` has another inode. A file whose ctime is within ``RACY_NS`` of the moment
it was hashed is not recorded (a write in the same clock tick would leave its ctime unchanged): it
is hashed again next time. The index is written atomically with a checksum and checked when read;
a damaged one is ignored (the files are hashed again), and its entries never count for more than
what a fresh ``stat`` confirms.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from distill_runner.errors import UserError
from distill_runner.io.cache import digest
from distill_runner.io.storage import DamagedFile, read_text_verified, sha256_of, sidecar, write_text_verified

log = logging.getLogger(__name__)

PRINTS_DIR, INDEX_NAME, INDEX_FORMAT = "prints", "content-hashes.json", 1  # <store_dir>/prints/...
RACY_NS = 2_000_000_000  # a file changed this recently is hashed again next time (see the module's doc)
SHA256 = re.compile(r"[0-9a-f]{64}")
_MEMORY: dict[str, list] = {}  # the index of a process without an index folder


def signature(path: str) -> tuple[str, list[int]]:
    """(inode key, [size, mtime_ns, ctime_ns]) of the file ``path`` resolves to (one ``stat``)."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashIndex:
    """sha256 of files, read once and reused while their ``stat`` signature is unchanged.
    ``folder``: where the index lives (None: this process's memory only)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.path = None if folder is None else Path(folder).expanduser() / PRINTS_DIR / INDEX_NAME

    def sha256(self, paths: Sequence[str]) -> list[str]:
        """The content hash of each file, in order."""
        known = self._load()
        found, new, hashed = [], {}, 0
        for path in paths:
            key, sig = signature(path)
            entry = known.get(key) or new.get(key)
            if entry is not None and entry[:3] == sig:
                found.append(entry[3])
                continue
            hashed += 1
            sha, now = sha256_of(path), time.time_ns()
            after = signature(path)  # written while it was read: hashed again next time
            if after == (key, sig) and now - sig[2] > RACY_NS:
                new[key] = [*sig, sha]
            found.append(sha)
        if hashed:
            log.info("hashed %d of %d data files (new, or changed since they were hashed)", hashed, len(paths))
        if new:
            self._save(new)
        return found

    def _load(self) -> dict[str, list]:
        if self.path is None:
            return _MEMORY
        if not self.path.is_file():
            return {}
        if not os.access(self.path.parent, os.W_OK):  # a read-only store: no lock to take, no writer to wait for
            return self._read()
        with FileLock(f"{self.path}.lock"):  # not between a parallel job's data file and its checksum
            return self._read()

    def _read(self) -> dict[str, list]:
        try:
            if not sidecar(self.path).is_file():  # not written by this code: not trusted
                raise DamagedFile(self.path, f"no checksum {sidecar(self.path).name}")
            meta = json.loads(read_text_verified(self.path))
            entries = meta["entries"]
            if meta["format"] != INDEX_FORMAT or not all(_valid(v) for v in entries.values()):
                raise ValueError(f"not a format-{INDEX_FORMAT} index")
            return entries
        except (DamagedFile, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("content-hash index %s is unreadable or damaged (%s); hashing the files again", self.path, exc)
            return {}

    def _save(self, new: dict[str, list]) -> None:
        if self.path is None:
            _MEMORY.update(new)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{self.path}.lock"):  # merged with what parallel jobs wrote meanwhile
                entries = {**(self._read() if self.path.is_file() else {}), **new}
                write_text_verified(self.path, json.dumps({"format": INDEX_FORMAT, "entries": entries}))
        except (OSError, UserError) as exc:
            log.warning("content hashes not kept in %s (%s): the files are hashed again next run", self.path, exc)


def _valid(entry: object) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 4
        and all(isinstance(v, int) for v in entry[:3])
        and isinstance(entry[3], str)
        and SHA256.fullmatch(entry[3]) is not None
    )


@dataclass(frozen=True)
class DataPrint:
    """Per file used, in order: (sha256, label, split); ``names`` (where each file was found, relative
    to the data set's root) only word :meth:`changes`, they are not part of the digest."""

    entries: tuple[tuple[str, str, str], ...]
    names: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return digest({"format": INDEX_FORMAT, "files": [list(e) for e in self.entries]})

    def to_json(self) -> str:
        return json.dumps({"entries": [list(e) for e in self.entries], "names": list(self.names)})

    @classmethod
    def from_json(cls, text: str) -> DataPrint:
        meta = json.loads(text)
        return cls(tuple(tuple(e) for e in meta["entries"]), tuple(meta["names"]))

    def changes(self, old: DataPrint) -> str | None:
        """What differs from ``old`` in words ("3 files' content, 2 labels, 1 added"), None if nothing."""
        if old.digest == self.digest:
            return None
        now, before = dict(zip(self.names, self.entries)), dict(zip(old.names, old.entries))
        content = sum(1 for n in now.keys() & before.keys() if now[n][0] != before[n][0])
        labels = _moved(self.entries, old.entries, 1)
        splits = _moved(self.entries, old.entries, 2)
        parts = [
            (content, "file's content", "files' content"),
            (labels, "label", "labels"),
            (splits, "split", "splits"),
            (len(now.keys() - before.keys()), "added", "added"),
            (len(before.keys() - now.keys()), "removed", "removed"),
        ]
        said = [f"{n} {one if n == 1 else many}" for n, one, many in parts if n]
        return ", ".join(said) or "the order of the files"


def _moved(entries, old_entries, field: int) -> int:
    """Files (by content) whose ``field`` (label or split) is not among the ones that content had before."""
    before: dict[str, Counter] = {}
    for e in old_entries:
        before.setdefault(e[0], Counter())[e[field]] += 1
    return sum(1 for e in entries if e[0] in before and before[e[0]][e[field]] == 0)


def report_changes(current: DataPrint, folder: str | os.PathLike | None, what: str, name: str) -> None:
    """Say in one line how ``current`` differs from the print the last run with the same data set and
    split settings (``what``: root and settings, hashed into the file name) saw; then remember it."""
    if folder is None:
        return
    path = Path(folder).expanduser() / PRINTS_DIR / f"{digest(what)}.json"
    old = None
    if path.is_file():
        try:
            old = DataPrint.from_json(read_text_verified(path))
        except (DamagedFile, OSError, ValueError, KeyError, TypeError):
            old = None  # only words a log line: a damaged one is replaced
    said = None if old is None else current.changes(old)
    if said is not None:
        log.warning(
            "%s changed since the last run that used it: %s -> rebuilding what depends on it: teachers, baselines, "
            "teacher outputs and evaluations cached for the old data are not reused (new keys)",
            name,
            said,
        )
    if old is None or said is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_verified(path, current.to_json())
        except (OSError, UserError) as exc:
            log.info("data print not kept in %s (%s)", path, exc)
