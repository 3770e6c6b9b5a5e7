"""A run folder belongs to one run: resumed only with the config it started with, never shared."""

import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import compose_config

from distill_runner import runner
from distill_runner.errors import ConfigError
from distill_runner.io.run_folder import OWNER, STARTED, claim, process_start, release


@pytest.mark.slow
def test_resume_into_a_fixed_folder_with_another_config_is_refused_naming_the_keys(fast, tmp_path):
    runner.run(compose_config(fast), tmp_path / "run")
    assert (tmp_path / "run" / STARTED).is_file() and not (tmp_path / "run" / OWNER).exists()
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config([*fast, "trainer.resume=auto", "distill.alpha=0.9"]), tmp_path / "run")
    assert err.value.key == "trainer.resume" and "distill.alpha 0.5 -> 0.9" in str(err.value)
    # keys that never change a result do not count; the same config resumes (here: all stages done)
    same = runner.run(compose_config([*fast, "trainer.resume=auto", "trainer.progress=true"]), tmp_path / "run")
    assert same.stages["student"].history


@pytest.mark.slow
def test_a_folder_holding_another_run_is_refused_without_resume(fast, tmp_path):
    runner.run(compose_config(fast), tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    with pytest.raises(ConfigError, match="hydra.run.dir=.*it holds another run; .*trainer.resume=auto"):
        runner.run(compose_config([*fast, "seed=1"]), tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").read_text() == metrics  # nothing of the first run was touched


@pytest.mark.slow
def test_a_folder_a_live_run_writes_into_is_refused_even_when_resuming(fast, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / OWNER).write_text(f"{other.pid} {socket.gethostname()}")
        with pytest.raises(ConfigError, match=f"another distill-run \\(pid {other.pid}\\) is writing into this folder"):
            runner.run(compose_config([*fast, "trainer.resume=auto"]), tmp_path / "run")
    finally:
        other.kill()
        other.wait()
    # its owner gone (killed), the folder can be resumed
    runner.run(compose_config([*fast, "trainer.resume=auto"]), tmp_path / "run")


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_folder(fast, tmp_path):
    args = [sys.executable, "-m", "distill_runner", *fast, f"hydra.run.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (error,) = [err for code, err in results if code == 2]
    lines = [line for line in error.splitlines() if "error" in line]
    assert len(lines) == 1 and "hydra.run.dir=" in lines[0] and "Traceback" not in error


def test_default_run_and_sweep_folders_are_unique_to_the_microsecond():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    # e.g. outputs/2026-11-25/01-30-05-123456: two runs started in the same second get two folders
    assert re.fullmatch(r"outputs/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}", cfg.hydra.run.dir)
    assert re.fullmatch(r"outputs/multirun/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}", cfg.hydra.sweep.dir)


def test_a_dead_runs_pid_reused_by_another_program_does_not_block_its_folder(fast, tmp_path):
    """``.owner`` records the pid's start time: a live pid that started later is another program."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        start = process_start(other.pid)
        (run / OWNER).write_text(f"{other.pid} {socket.gethostname()} {int(start) - 1}")  # the killed run's
        cfg = compose_config([*fast, "trainer.resume=auto"])
        claim(cfg, run, resuming=True)  # taken over
        assert (run / OWNER).read_text().split()[0] == str(os.getpid())
        release(run)
        (run / OWNER).write_text(f"{other.pid} {socket.gethostname()} {start}")  # that very process
        with pytest.raises(ConfigError) as err:
            claim(cfg, run, resuming=True)
        assert f"(pid {other.pid}) is writing into this folder ({run / OWNER} names it)" in str(err.value)
        (run / OWNER).write_text(f"{other.pid} {socket.gethostname()}")  # the previous version's: not Python
        claim(cfg, run, resuming=True)
        release(run)
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_a_run_resumed_from_another_folder_logs_on_in_that_folders_log(fast, tmp_path):
    """Hydra opens the new folder's log before the folder to resume is known: the log moves, no folder stays."""
    first, again = tmp_path / "run", tmp_path / "again"
    base = [sys.executable, "-m", "distill_runner", *fast]
    done = subprocess.run([*base, f"hydra.run.dir={first}"], cwd=tmp_path, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before = (first / "distill-run.log").read_text()
    resumed = subprocess.run(
        [*base, f"trainer.resume={first}", f"hydra.run.dir={again}"], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not again.exists()
    log = (first / "distill-run.log").read_text()
    assert log.startswith(before) and f"resuming the run in {first}" in log[len(before) :]
    assert "stage student: finished before" in log[len(before) :] and "results on the test split" in log[len(before) :]
    assert [p.name for p in first.glob("*.log")] == ["distill-run.log"]
