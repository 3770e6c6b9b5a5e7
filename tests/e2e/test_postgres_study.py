"""A real PostgreSQL server (scripts/postgres_local.sh) as distill-search's shared Optuna study: a worker killed
mid-trial has its trial failed and its student enqueued again, run once more; a server that cannot be reached is
one line naming the URL (password hidden), the reason and the fix."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
from conftest_cluster import free_port, job_env, postgres_url_fixture, wait_for  # noqa: F401 (the postgres_url fixture)
from search_setup import SMALL, search_config, trials

pytest.importorskip("optuna", minversion="4")
pytest.importorskip("psycopg", reason="the search extra's PostgreSQL driver: pip install -e '.[search]'")

from hydra import compose, initialize_config_module

from distill_runner.errors import ConfigError
from distill_runner.search import study as studies


def test_an_unreachable_server_is_one_line(tmp_path):
    port = free_port()  # nothing listens there
    url = f"postgresql://distill:secret@127.0.0.1:{port}/distill"
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        node = compose(config_name="distill_search", overrides=[f"search.storage={url}"]).search
    with pytest.raises(ConfigError) as err:
        studies.storage(node, tmp_path)
    message = str(err.value)
    assert message.startswith(f"search.storage='postgresql://distill:***@127.0.0.1:{port}/distill': cannot open it (")
    assert f"port {port} failed: Connection refused" in message and "secret" not in message and "\n" not in message
    assert message.endswith("check that the server is up and the URL, or use null (a journal file)")


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_failed_and_its_student_run_again(tmp_path, postgres_url):
    """A worker (search.role=worker) is killed while it trains a trial; the search started next finds the trial
    left running by a dead process, fails it, enqueues its student again and finishes the study."""
    study = f"killed-{uuid.uuid4().hex[:8]}"
    shared = [f"search.storage={postgres_url}", f"search.study_name={study}", f"cache.dir={tmp_path / 'cache'}"]
    command = [sys.executable, "-m", "distill_runner.search", *SMALL, *search_config(tmp_path / "conf"), *shared]
    worker = subprocess.Popen([*command, "search.role=worker", "search.worker=1", f"hydra.run.dir={tmp_path / 'w'}"],
                              cwd=tmp_path, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        training = lambda: next((t for t in trials(postgres_url, study, "RUNNING") if "cost" in t.user_attrs), None)
        killed = wait_for(training, 300, "the worker's trial to train", poll_s=0.1, process=worker)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        worker.kill()
    assert [t.number for t in trials(postgres_url, study, "RUNNING")] == [killed.number]  # left running
    main = subprocess.run([*command, f"hydra.run.dir={tmp_path / 's'}"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert main.returncode == 0, main.stderr[-3000:]
    finished, failed = trials(postgres_url, study, "COMPLETE", "PRUNED"), trials(postgres_url, study, "FAIL")
    assert len(finished) == 4 and [t.number for t in failed] == [killed.number]
    assert not trials(postgres_url, study, "RUNNING", "WAITING")
    (retry,) = [t for t in finished if t.user_attrs.get("retry_of") == killed.number]
    assert retry.params == killed.params
    assert (
        f"trial {killed.number} was left running by a killed process"
        in (tmp_path / "s" / "distill-search.log").read_text()
    )
