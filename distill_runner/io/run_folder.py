"""The run folder: which one a resumed run continues, that it belongs to this run alone, and whether
it (and the cache) can take what the run will write, all checked before any training.

Docs: docs/guide/resume-and-faults.md
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from distill_runner.errors import ConfigError, UserError
from distill_runner.io import storage
from distill_runner.io.cache import NOT_RESULTS, covered
from distill_runner.io.storage import atomic_write_text
from distill_runner.io.trust import pid_alive
from distill_runner.schema import dump_yaml, load_plain
from distill_runner.spec import RunSpec, typed


def check_room(run_dir: Path, cache_root: Path | None, run_bytes: int, cache_bytes: int) -> None:
    """Before training: the run folder and the cache (``cache_root``, None when disabled) are writable and
    their disks hold what the run will write there (``run_bytes``, ``cache_bytes``), summed per disk: a run
    folder and a cache on one disk share its free space. Temp files that killed writers left in them are
    removed first."""
    storage.check_writable(run_dir, "hydra.run.dir")
    storage.remove_stale_temps(run_dir)  # the folder is this run's (claimed): no one else writes there
    needs = [(run_dir, "hydra.run.dir", run_bytes, "checkpoints of the teacher, the student and the baseline")]
    if cache_root is not None:
        storage.check_writable(cache_root, "cache.dir")
        storage.remove_stale_temps(cache_root, min_age_s=storage.STALE_AFTER_S)  # jobs on other machines share it
        needs.append((cache_root, "cache.dir", cache_bytes, "cached teachers, baseline and teacher outputs"))
    storage.check_free_space_per_disk(needs)


def follow_log(new_dir: Path, run_dir: Path) -> None:
    """A run resumed in another folder logs there: Hydra opened ``new_dir/<job>.log`` before that folder
    was known. What it holds so far is appended to ``run_dir``'s log, which the log goes on in, and
    ``new_dir``, made for this start and holding nothing else (but Hydra's .hydra/), is removed."""
    root, moved = logging.getLogger(), False
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler) or Path(handler.baseFilename).parent != new_dir.absolute():
            continue
        handler.flush()
        log_file = Path(handler.baseFilename)
        target = run_dir / log_file.name
        with open(target, "a") as f:
            f.write(log_file.read_text())
        follower = logging.FileHandler(target, mode="a", encoding=handler.encoding)
        follower.setLevel(handler.level)
        follower.setFormatter(handler.formatter)
        root.addHandler(follower)
        root.removeHandler(handler)
        handler.close()
        log_file.unlink()
        moved = True
    if moved and set(os.listdir(new_dir)) <= {".hydra"}:
        shutil.rmtree(new_dir)
        with contextlib.suppress(OSError):
            new_dir.parent.rmdir()  # outputs/<date>/ when it held only this start


def _without_resume(items) -> list:
    return [o for o in items if not o.lstrip("+~").startswith("trainer.resume")]


def resume_dir(spec: RunSpec, run_dir: Path, overrides: list[str]) -> Path:
    """The run folder to continue: ``trainer.resume=PATH``, or with ``true`` this run's folder if it
    holds checkpoints, else the newest unfinished run under the same outputs folder started with
    the same overrides. Its config must equal this one (but for ``trainer.resume``). With ``auto``:
    this run's folder, whatever it holds (a fixed ``hydra.run.dir``, a requeued Slurm job)."""
    spec = typed(spec)
    resume = spec.trainer.resume
    if resume == "auto":
        return run_dir
    if resume is True:
        if (run_dir / "checkpoints").is_dir():
            found = run_dir
        else:
            root = run_dir.parent.parent  # outputs/<date>/<time> -> outputs
            candidates = [
                p.parent.parent
                for p in root.glob("*/*/.hydra/overrides.yaml")
                if p.parent.parent != run_dir
                and not (p.parent.parent / "report.md").exists()  # written last: a finished run
                and (p.parent.parent / "checkpoints").is_dir()
                and _without_resume(load_plain(p)) == _without_resume(overrides)
            ]
            if not candidates:
                raise ConfigError(
                    "trainer.resume",
                    True,
                    f"no unfinished run with the same overrides under {root}/; name the run folder: "
                    "trainer.resume=outputs/<date>/<time>",
                )
            found = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        found = Path(str(resume)).expanduser()
        if not (found / ".hydra" / "config.yaml").is_file():
            raise ConfigError(
                "trainer.resume",
                str(resume),
                "not a run folder (no .hydra/config.yaml in it); give outputs/<date>/<time> of the run to continue",
            )
    if found != run_dir:  # another folder: compare with the config it was started with
        saved = found / STARTED if (found / STARTED).is_file() else found / ".hydra" / "config.yaml"
        if saved.is_file():
            check_same_config(spec, saved, found)
    return found


# ------------------------------------------------------------------------------- who owns a folder

STARTED = "run_config.yaml"  # the config the folder's run started with (Hydra rewrites .hydra/config.yaml each start)
OWNER = ".owner"  # "<pid> <host> <start time of the pid>" of the distill-run writing here
STARTING_S = 60  # an owner file still empty this long after its creation belongs to no live run


def _owner(path: Path) -> tuple[int, str, str | None] | None:
    try:
        pid, host, *start = path.read_text().split()  # no start time: written by the previous version
        return int(pid), host, start[0] if start else None
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot: /proc/<pid>/stat field 22); None where unknown.
    With the pid it names one process: a pid reused by another program has another start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # after "(comm)": field 3 on
    except (OSError, IndexError):
        return None


def _runs_here(pid: int, host: str, start: str | None) -> bool:
    """The owner recorded in ``.owner`` still runs on this machine: its pid is alive and is the same
    process (same start time), or, for an owner file without one, a Python process at least."""
    if host != socket.gethostname() or not pid_alive(pid):
        return False
    if start is not None:
        now = process_start(pid)
        return now is None or now == start
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def claim(spec: RunSpec, run_dir: Path, resuming: bool) -> None:
    """Make ``run_dir`` this run's: never shared by two runs. Refused (one line): a folder another live
    run writes into; without ``trainer.resume``, a folder that holds another run; with it, a folder
    started with another config (compared with the copy written at its start, not with Hydra's
    ``.hydra/config.yaml``, which the new start has already overwritten)."""
    spec = typed(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    owner, started = run_dir / OWNER, run_dir / STARTED
    me = f"{os.getpid()} {socket.gethostname()} {process_start(os.getpid()) or ''}".strip()
    try:  # O_EXCL: of two runs starting together, exactly one creates it
        fd = os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(me)
    except FileExistsError:
        found = _owner(owner)
        if found is None and time.time() - owner.stat().st_mtime < STARTING_S:
            fix = f"another distill-run is starting in this folder ({owner} is new); wait for it or choose another"
            raise ConfigError("hydra.run.dir", str(run_dir), fix) from None
        if found is not None and found[0] != os.getpid():
            pid, host, start = found
            if _runs_here(pid, host, start):
                fix = (f"another distill-run (pid {pid}) is writing into this folder ({owner} names it); wait for it "
                       f"or choose another folder; if no distill-run writes there, delete {owner}")  # fmt: skip
                raise ConfigError("hydra.run.dir", str(run_dir), fix) from None
            if host != socket.gethostname() and not resuming:
                fix = f"a distill-run on {host} (pid {pid}) owns this folder; choose another folder or resume it"
                raise ConfigError("hydra.run.dir", str(run_dir), fix) from None
        atomic_write_text(owner, me)  # its owner is gone (killed, or requeued elsewhere): take it over
    try:
        if started.is_file() and not resuming:
            fix = "it holds another run; choose another folder, or continue that run with trainer.resume=auto"
            raise ConfigError("hydra.run.dir", str(run_dir), fix)
        if started.is_file():
            check_same_config(spec, started, run_dir)
        else:
            atomic_write_text(started, dump_yaml(spec.as_dict()))
    except UserError:
        release(run_dir)
        raise


def release(run_dir: Path) -> None:
    """The run is over (finished or failed): the folder no longer has a live owner, and a run that
    stopped before it trained anything (a bad layer name, say) leaves no run behind."""
    run_dir = Path(run_dir)
    owner = run_dir / OWNER
    found = _owner(owner)
    if found is not None and found[0] == os.getpid():
        if not (run_dir / "checkpoints").exists():
            (run_dir / STARTED).unlink(missing_ok=True)
        owner.unlink(missing_ok=True)


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_config(spec: RunSpec, saved_file: Path, folder: Path) -> None:
    """The run in ``folder`` was started with this config, up to keys that never change a result
    (progress bars, loader workers, ...: :data:`distill_runner.io.cache.NOT_RESULTS`)."""
    saved, now = _flat(load_plain(saved_file)), _flat(spec.as_dict())
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not covered(k, NOT_RESULTS))
    if diff:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:5]) + (
            " ..." if len(diff) > 5 else ""
        )
        fix = f"the run in {folder} was started with another config ({shown}); resume it with the same overrides"
        raise ConfigError("trainer.resume", spec.trainer.resume, fix)
