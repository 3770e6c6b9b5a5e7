"""The Optuna study of a search: its storage (a journal file in the search folder, or an RDB URL), the
sampler and pruner the config names, and the loop each process runs until the study holds
``search.trials`` finished trials.

Pruning: Optuna's pruners work on single-objective studies only (``Trial.report`` and
``should_prune`` refuse a multi-objective one), so each trial of the search has a twin in a second,
single-objective study of the same storage (``<study_name>.pruning``, maximize). The twin receives the
trial's per-epoch validation accuracy, and the configured pruner decides on the twin exactly as it would
on a single-objective study of accuracy; a pruned twin prunes the trial.

Resume: a trial left running by a killed process is marked failed and its parameters are enqueued
again, so the same student is retried: by Optuna's heartbeat for an RDB storage
(``RetryFailedTrialCallback``), and for the journal (which has no heartbeat) by the process id and host
each trial records, when the search restarts on that host.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import time
import warnings
from pathlib import Path

from distill_runner.errors import ConfigError, instantiate
from distill_runner.io.storage import pid_alive
from distill_runner.search_spec import SearchSpec

log = logging.getLogger(__name__)

HEARTBEAT_S = 60  # RDB storages: a trial whose process stopped beating for 2 heartbeats is failed and retried
JOURNAL_SETTLE_S = 1.0  # an append under way completes well within this
FINISHED = ("COMPLETE", "PRUNED")
WORKER_SEED_STEP = 100_003  # worker i's sampler seed: search.sampler.seed + i * this (+ the trials already run)


def optuna():
    """The optuna module, or one line saying what to install."""
    try:
        import optuna as module
    except ImportError:
        raise ConfigError("search", "optuna", "distill-search needs Optuna >= 4: pip install -e '.[search]'") from None
    if int(module.__version__.split(".")[0]) < 4:
        fix = f"Optuna {module.__version__} is installed; distill-search needs >= 4: pip install -e '.[search]'"
        raise ConfigError("search", "optuna", fix)
    return module


def storage(search: SearchSpec, search_dir: Path, heartbeat: bool = True):
    """``search.storage``: null (the journal file ``<search folder>/study.journal``), a journal file of its own
    (``PATH.journal``: workers started in other folders, e.g. by a Hydra launcher, share it) or an RDB URL; an
    RDB's trials beat (``heartbeat``), and one whose process stopped beating is failed and enqueued again.
    A storage that cannot be opened is one line naming ``search.storage``, the value and the fix."""
    value = search.storage
    if value is None or (isinstance(value, str) and value.endswith(".journal") and "://" not in value):
        path = search_dir / "study.journal" if value is None else Path(value).expanduser()
        return journal_storage(path, value, search.repair_journal)
    if not isinstance(value, str) or "://" not in value:
        fix = "use null (<search folder>/study.journal), a file PATH.journal or an RDB URL, e.g. sqlite:///search.db"
        raise ConfigError("search.storage", value, fix)
    try:
        return rdb_storage_once_created(value, heartbeat)
    except ConfigError:
        raise
    except ImportError as exc:  # the URL's database driver (psycopg2, pymysql, ...)
        module = (exc.name or getattr(exc.__cause__, "name", None) or "?").split(".")[0]  # Optuna wraps it
        package = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}.get(
            module, module
        )
        fix = f"its database driver is not installed ({module}): pip install {package}, or use null (a journal file)"
        raise ConfigError("search.storage", _shown(value), fix) from None
    except Exception as exc:  # sqlalchemy's OperationalError: server down, wrong host, port, user or database
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        fix = f"cannot open it ({reason}); check that the server is up and the URL, or use null (a journal file)"
        raise ConfigError("search.storage", _shown(value), fix) from None


def _shown(url: str) -> str:
    """The URL without its password (an error message may end up in a shared log)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def rdb_storage_once_created(url: str, heartbeat: bool, tries: int = 5):
    """:func:`rdb_storage`, retried where workers started together race to create the schema of a new database
    (PostgreSQL's "duplicate key value violates unique constraint" on its type catalogue): the loser finds the
    tables made on its next try."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError  # duplicate key; "relation already exists"

    for attempt in range(tries):
        try:
            return rdb_storage(url, heartbeat)
        except (IntegrityError, ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def rdb_storage(url: str, heartbeat: bool):
    opt = optuna()
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        folder = Path(url.removeprefix("sqlite:///").split("?")[0]).expanduser().parent
        if not folder.is_dir():  # sqlite creates the file, never its folder
            fix = f"the folder {folder} does not exist: create it (mkdir -p {folder}) or use null (a journal file)"
            raise ConfigError("search.storage", url, fix)
    if not heartbeat:
        return opt.storages.RDBStorage(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opt.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
        if hasattr(opt.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9 deprecates the other
            retry = {"heartbeat_stale_trial_callback": opt.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
        else:
            retry = {"failed_trial_callback": opt.storages.RetryFailedTrialCallback(max_retry=3)}
        return opt.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, **retry)


def journal_storage(path: Path, value, repair: bool):
    """The journal at ``path``, checked before Optuna opens it: Optuna appends after a damaged line (a crash
    mid-append leaves one), which makes the whole study unreadable, so a damaged journal is never opened."""
    from optuna.storages.journal import JournalFileBackend

    shown = value if value is not None else str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        bad = first_bad_line(path)
        if bad is not None:  # or another process is appending that line right now: look again
            time.sleep(JOURNAL_SETTLE_S)
            bad = first_bad_line(path)
        if bad is not None and repair:
            repair_journal(path, *bad)
        elif bad is not None:
            line, offset = bad
            fix = (f"the journal is damaged at line {line} (a process stopped while writing it); keep the {line - 1} "
                   f"lines before it with: truncate -s {offset} {shlex.quote(str(path))} (or run again with "
                   "search.repair_journal=true, which keeps a copy of the damaged file)")  # fmt: skip
            raise ConfigError("search.storage", shown, fix)
        return optuna().storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        fix = f"cannot open the journal {path} ({exc.strerror or exc}); choose a writable file or folder"
        raise ConfigError("search.storage", shown, fix) from None


def first_bad_line(path: Path) -> tuple[int, int] | None:
    """(line number from 1, its byte offset) of the first line that is not one whole JSON record; None: all are."""
    if not path.exists():
        return None
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no line end")
                json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                return number, offset
            offset += len(line)
    return None


def repair_journal(path: Path, line: int, offset: int) -> None:
    """Keep the whole lines before ``line``; the damaged file is kept as ``<path>.damaged``."""
    copy = path.with_name(path.name + ".damaged")
    shutil.copy2(path, copy)
    with path.open("r+b") as f:
        f.truncate(offset)
    log.warning("search.repair_journal: %s was damaged at line %d: kept the %d lines before it (the damaged file "
                "is %s)", path, line, line - 1, copy)  # fmt: skip


def directions(search: SearchSpec) -> list[str]:
    return ["maximize"] if search.objective is None else ["maximize", "minimize"]


def constraints(trial) -> list[float]:
    """Optuna 4's constraints_func: each budget's excess (<= 0 within budget), recorded by the trial before training."""
    return trial.user_attrs.get("constraints", [])


def set_constraints(trial, excess: dict[str, float]) -> None:
    """Each budget's excess for the sampler: ``Trial.set_constraint`` on Optuna 5 (which deprecates
    ``constraints_func``), the user attribute :func:`constraints` reads on Optuna 4."""
    trial.set_user_attr("constraints", list(excess.values()))
    if hasattr(trial, "set_constraint"):
        for key, value in excess.items():
            trial.set_constraint(f"budget.{key}", value)


def sampler_takes_constraints_func() -> bool:
    return not hasattr(optuna().trial.Trial, "set_constraint")


def sampler(search: SearchSpec, offset: int):
    """``search.sampler``, its seed (if any) moved by ``offset``: parallel workers and a resumed search must not
    draw the same values as the process before them (a seeded sampler in each repeats one sequence)."""
    extra = {"constraints_func": constraints} if search.budgets() and sampler_takes_constraints_func() else {}
    if search.sampler.get("seed") is not None:
        extra["seed"] = search.sampler["seed"] + offset
    try:
        return instantiate(search.sampler, "search.sampler", **extra)
    except ConfigError:  # a sampler that takes no constraints: budgets still decide the final choice
        extra.pop("constraints_func", None)
        log.warning("search.sampler %s takes no constraints_func: it does not learn the budgets",
                    search.sampler["_target_"])  # fmt: skip
        return instantiate(search.sampler, "search.sampler", **extra)


def studies(search: SearchSpec, search_dir: Path):
    """The search's study and its pruning study (its twin), created or loaded from the storage."""
    opt = optuna()
    store = storage(search, search_dir)
    name = search.study_name
    study = opt.create_study(study_name=name, storage=store, directions=directions(search), load_if_exists=True)
    if list(study.directions) != [opt.study.StudyDirection[d.upper()] for d in directions(search)]:
        fix = "the study in this storage has other objectives; use another search folder or search.study_name"
        raise ConfigError("search.objective", search.objective, fix)
    # a fresh single-process search draws from search.sampler.seed itself: it is repeatable
    study.sampler = sampler(search, WORKER_SEED_STEP * search.worker + len(study.get_trials(deepcopy=False)))
    pruner = instantiate(search.pruner, "search.pruner")
    # the pruning study's trials are told by hand (ask/tell), never by Study.optimize: no heartbeat for them
    pruning_store = store if search.storage is None else storage(search, search_dir, heartbeat=False)
    pruning_study = opt.create_study(study_name=f"{name}.pruning", storage=pruning_store, pruner=pruner,
                                     direction="maximize", load_if_exists=True)  # fmt: skip
    return study, pruning_study


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def runs_here(trial) -> bool | None:
    """A running trial's process is alive on this host (True), was on this host and is gone (False), or
    runs elsewhere (None: no process id of this host to check)."""
    pid = trial.user_attrs.get("pid")
    if trial.user_attrs.get("host") != socket.gethostname() or pid is None:
        return None
    return pid_alive(pid)


def recover_orphans(study, pruning_study, pids: set[int] | None = None) -> int:
    """Fail (and enqueue again) the trials left running by a killed process of this host (``pids``: only
    those of these processes)."""
    opt = optuna()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(opt.trial.TrialState.RUNNING,)):
        if runs_here(t) is not False or (pids is not None and t.user_attrs["pid"] not in pids):
            continue
        pid = t.user_attrs["pid"]
        study.tell(t.number, state=opt.trial.TrialState.FAIL, skip_if_finished=True)
        if (number := t.user_attrs.get("twin")) is not None:
            pruning_study.tell(number, state=opt.trial.TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log.info("trial %d was left running by a killed process (pid %d): failed, its parameters enqueued again",
                 t.number, pid)  # fmt: skip
        recovered += 1
    return recovered


def enqueue_requested(study, search: SearchSpec, entries) -> None:
    """``search.enqueue``: trials to run first, once per study (a resumed search does not add them again)."""
    requested = search.enqueue or []
    if study.user_attrs.get("enqueued") == len(requested) or not requested:
        return
    by_key = {e.key: e for e in entries}
    for i, params in enumerate(requested):
        fixed = {}
        for key, value in params.items():
            entry, where = by_key.get(key), f"search.enqueue[{i}].{key}"
            if entry is None:
                raise ConfigError(where, value, "not a key of search.space")
            if entry.choices is not None and value not in entry.choices:
                raise ConfigError(where, value, f"not one of its choices {entry.choices}")
            fixed[key] = entry.labels()[entry.choices.index(value)] if entry.choices is not None else value
        study.enqueue_trial(fixed, skip_if_exists=True)
    study.set_user_attr("enqueued", len(requested))


def mark(trial) -> None:
    """Record who runs ``trial`` (a restart on this host fails it if that process is gone)."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def should_start(study, total: int) -> bool:
    """Another trial is wanted: finished + running trials are fewer than ``total``."""
    c = counts(study)
    return sum(c.get(s, 0) for s in (*FINISHED, "RUNNING")) < total
