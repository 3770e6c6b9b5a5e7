"""distill-search faults: a storage that cannot be opened and a damaged journal are one line (the journal is never
written to again until fixed), a worker killed mid-trial does not hang the search, and Ctrl-C says how to continue
and retries the interrupted trial."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

optuna = pytest.importorskip("optuna", minversion="4")

from test_search import SMALL, trials, write_space  # noqa: E402

from distill_runner.config import validate  # noqa: E402
from distill_runner.errors import ConfigError  # noqa: E402
from distill_runner.search import study as studies  # noqa: E402


def search_node(*overrides: str):
    """The typed search node, as distill-search validates it."""
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return validate(compose(config_name="distill_search", overrides=list(overrides))).search


@pytest.mark.parametrize(
    "value,fix",
    [
        ("sqlite:///{tmp}/missing/s.db", "the folder {tmp}/missing does not exist: create it (mkdir -p"),
        ("sqlite:///{tmp}", "cannot open it (unable to open database file)"),  # a folder: as a server that is down
        ("{tmp}/folder.journal", "cannot open the journal {tmp}/folder.journal (Is a directory)"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, value, fix):
    (tmp_path / "folder.journal").mkdir()
    value, fix = value.format(tmp=tmp_path), fix.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as err:
        studies.storage(search_node(f"search.storage={value}"), tmp_path)
    assert str(err.value).startswith(f"search.storage='{value}': {fix}") and "\n" not in str(err.value)


def test_a_missing_database_driver_or_a_server_that_is_down_is_one_line(tmp_path):
    """No driver installed here: what to install; with one, the server (port 1) is down: check the server."""
    with pytest.raises(ConfigError) as err:
        studies.storage(search_node("search.storage=postgresql://u:secret@127.0.0.1:1/db"), tmp_path)
    message = str(err.value)
    assert message.startswith("search.storage='postgresql://u:***@127.0.0.1:1/db': ") and "secret" not in message
    assert ("is not installed (psycopg" in message and "pip install" in message) or "check that the server" in message


def make_journal(path: Path, n: int = 3) -> None:
    storage = studies.journal_storage(path, None, False)
    study = optuna.create_study(study_name="distill-search", storage=storage, direction="maximize")
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=float(i)))


@pytest.mark.slow
def test_a_damaged_journal_is_never_appended_to_and_the_printed_fix_works(tmp_path):
    """A crash mid-append leaves a partial last line: Optuna would append after it and the study would be
    unreadable for good. It is refused before opening, naming the file, the line and a command that fixes it."""
    journal = tmp_path / "study.journal"
    make_journal(journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    damaged = b"".join(lines) + lines[-1][: len(lines[-1]) // 2]  # the next record, cut mid-write
    journal.write_bytes(damaged)
    node = search_node("search.objective=null")  # the study above: accuracy alone
    with pytest.raises(ConfigError) as err:
        studies.studies(node, tmp_path)
    message = str(err.value)
    assert message.startswith(f"search.storage='{journal}': the journal is damaged at line {len(lines) + 1} ")
    assert journal.read_bytes() == damaged  # untouched
    command = message.split("with: ", 1)[1].split(" (or run", 1)[0]
    assert command.startswith("truncate -s ")
    subprocess.run(shlex.split(command), check=True, timeout=60)
    study, _ = studies.studies(node, tmp_path)
    assert [t.value for t in study.get_trials()] == [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_a_garbage_line_inside_the_journal_is_cut_by_repair_journal(tmp_path):
    journal = tmp_path / "study.journal"
    make_journal(journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    damaged = b"".join([*lines[:-1], b'{"op_code": 5, \xff\n', lines[-1]])
    journal.write_bytes(damaged)
    with pytest.raises(ConfigError, match=f"damaged at line {len(lines)} "):
        studies.studies(search_node("search.objective=null"), tmp_path)
    study, _ = studies.studies(search_node("search.objective=null", "search.repair_journal=true"), tmp_path)
    assert [t.value for t in study.get_trials()] == [0.0, 1.0]  # the lines before the damaged one
    assert (tmp_path / "study.journal.damaged").read_bytes() == damaged


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the searches below: the teacher is fine-tuned once."""
    return tmp_path_factory.mktemp("cache")


def start_search(tmp_path: Path, cache_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path, list[str]]:
    folder = tmp_path / "s"
    space = write_space(tmp_path / "conf", "tiny", trials=3, final=False, enqueue=[])
    command = [sys.executable, "-m", "distill_runner.search", *SMALL, f"cache.dir={cache_dir}", "search=tiny", space,
               f"hydra.run.dir={folder}", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT as the default: a test runner in the background ignores it, and its children would inherit that
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    return process, folder / "study.journal", command


def training(journal: Path, process: subprocess.Popen, by_worker: bool = False, timeout_s: float = 300):
    """The first running trial whose student is built (``by_worker``: of a process other than ``process``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [t for t in trials(journal, "RUNNING") if "cost" in t.user_attrs]
        found = [t for t in found if t.user_attrs["pid"] != process.pid] if by_worker else found
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no trial started training"
        time.sleep(0.05)


def retried_once(journal: Path, total: int) -> None:
    """Every trial is finished once: the failed (killed or interrupted) ones each by one retry of its student."""
    finished, failed = trials(journal, "COMPLETE", "PRUNED"), trials(journal, "FAIL")
    assert len(finished) == total and failed and not trials(journal, "RUNNING", "WAITING")
    for lost in failed:
        (retry,) = [t for t in finished if t.user_attrs.get("retry_of") == lost.number]
        assert retry.params == lost.params


@pytest.mark.slow
def test_a_worker_killed_mid_trial_does_not_hang_the_search(tmp_path, cache_dir):
    # 6 trials of 3 epochs: the main process alone needs longer than the worker takes to start one
    slow = ("search.trials=6", "search.trial_epochs=3")
    process, journal, _ = start_search(tmp_path, cache_dir, "search.workers=2", *slow)
    worker = training(journal, process, by_worker=True)
    os.kill(worker.user_attrs["pid"], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)  # before: waited forever on the unreaped worker
    assert process.returncode == 0, stderr[-2000:]
    assert [t.number for t in trials(journal, "FAIL")] == [worker.number]
    retried_once(journal, total=6)
    assert "1 of 1 worker processes failed" in (tmp_path / "s" / "distill-search.log").read_text()


@pytest.mark.slow
def test_ctrl_c_in_distill_search_says_how_to_continue_and_retries_the_trial(tmp_path, cache_dir):
    process, journal, _ = start_search(tmp_path, cache_dir, "search.workers=2")
    interrupted = training(journal, process)
    process.send_signal(signal.SIGINT)  # to the main process only: it stops its worker as Ctrl-C would
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("distill-search: interrupted; continue with: distill-search ")
    assert interrupted.number in [t.number for t in trials(journal, "FAIL")] and not trials(journal, "RUNNING")
    command = shlex.split(last.split("continue with: ", 1)[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "distill_runner.search", *command[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    retried_once(journal, total=3)


@pytest.mark.parametrize(
    "override,start",
    [
        ("hydra.run.dir=/proc/no-such-folder", "distill-search: error: hydra.run.dir='/proc/no-such-folder': "),
        ("search.storage=sqlite:////no-such-folder/s.db", "distill-search: error: search.storage='sqlite:////no-such"),
    ],
)
@pytest.mark.slow
def test_distill_search_errors_carry_its_own_name(tmp_path, override, start):
    args = [override] if override.startswith("hydra.") else [override, f"hydra.run.dir={tmp_path / 's'}"]
    proc = subprocess.run([sys.executable, "-m", "distill_runner.search", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(start)
