"""hydra/launcher=slurm on a real single-node Slurm cluster: a T x alpha sweep trains the teacher once and gives the
numbers of the same sweep with the basic launcher, without sacct's warning on every poll; jobs that fail on the
cluster are named with their log files; without Slurm the launcher is one line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from conftest_cluster import SLURM, job_env, slurm_cluster_fixture  # noqa: F401 (the slurm_cluster fixture)

SWEEP = ["distill.temperature=2,4", "distill.alpha=0.5,0.9"]
BRIEF_TIMING = ["eval.latency_budget_s=0.02", "eval.throughput_budget_s=0.05"]
TIMEOUT_S = 420


def distill_run(args: list[str], cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_runner", *args], cwd=cwd, env=env or job_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


def summary(sweep: Path) -> dict[str, dict]:
    with (sweep / "summary.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_a_t_by_alpha_sweep_on_slurm_trains_the_teacher_once_and_equals_the_basic_launcher(tmp_path):
    # -m first: argparse takes the overrides after it as one run of words
    common = ["-m", *TINY, "teacher=wide_cnn", *BRIEF_TIMING, *SWEEP]
    on_slurm = distill_run([*common, *SLURM, f"hydra.sweep.dir={tmp_path / 'slurm'}", "cache.dir=cache_slurm"],
                           tmp_path)  # fmt: skip
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    basic = distill_run([*common, f"hydra.sweep.dir={tmp_path / 'basic'}", "cache.dir=cache_basic"], tmp_path)
    assert basic.returncode == 0, basic.stderr[-3000:]

    jobs = sorted((tmp_path / "slurm").glob("*/metrics.json"))
    assert len(jobs) == 4 and list((tmp_path / "slurm" / ".submitit").glob("*_3/*_log.out"))  # ran as Slurm jobs
    assert len(list((tmp_path / "cache_slurm" / "teachers").glob("*.model.pt"))) == 1  # one teacher for 4 jobs
    fine_tuned = [j for j in jobs if "reusing teacher " not in (j.parent / "distill-run.log").read_text()]
    assert len(fine_tuned) == 1, [j.parent.name for j in fine_tuned]
    slurm_rows, basic_rows = summary(tmp_path / "slurm"), summary(tmp_path / "basic")
    assert sorted(slurm_rows) == sorted(basic_rows) and len(slurm_rows) == 4
    for job, row in slurm_rows.items():
        for column in ("student_val_acc", "student_acc", "baseline_acc", "teacher_acc"):
            assert row[column] == basic_rows[job][column], (job, column)
    # no accounting on this cluster: job states come from squeue, and sacct's failure is not logged on every poll
    assert on_slurm.stderr.count("Bypassing sacct error") <= 1, on_slurm.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_jobs_that_fail_on_the_cluster_are_named_with_their_log_files(tmp_path, fast):
    sweep = ["distill.temperature=2,-1", f"hydra.sweep.dir={tmp_path / 's'}"]
    done = distill_run(["-m", *fast, *BRIEF_TIMING, *SLURM, *sweep], tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    log = next((tmp_path / "s" / ".submitit").glob("*_1/*_1_0_log.err"))
    assert last == (f"distill-run: error: 1 of the sweep's jobs failed on the cluster: job 1_T=-1: {log} "
                    f"(listed in {tmp_path / 's' / 'failed_jobs.json'})")  # fmt: skip
    assert "Traceback" not in done.stderr
    text = (tmp_path / "s" / "summary.md").read_text()  # the summary of the job that finished, and the failed one
    assert "| 0_T=2 |" in text and f"| 1_T=-1 | {log} | distill-run: error: distill.temperature=-1: must be" in text


@pytest.mark.slow
def test_the_slurm_launcher_without_slurm_is_one_line(tmp_path):
    env = {**job_env(), "PATH": "/usr/local/nonexistent"}  # no sbatch, srun
    done = distill_run(["-m", *SLURM, "distill.temperature=2,4"], tmp_path, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith("distill-run: error: hydra/launcher=slurm: Slurm is not installed here (no sbatch")
    assert "hydra/launcher=joblib" in done.stderr and not (tmp_path / "outputs").exists()


def test_sacct_failures_are_logged_once_not_on_every_poll(caplog):
    """On a cluster where sacct fails (and accounting is not simply off), submitit warns on every poll: once here."""
    import logging

    from distill_runner.slurm import OnceFilter

    submitit_log = logging.getLogger("submitit")
    once = OnceFilter()
    submitit_log.addFilter(once)
    try:
        for call in range(1, 6):
            submitit_log.warning(f"Call #{call} - Bypassing sacct error exit status 1, status may be inaccurate.")
        submitit_log.warning("another warning")
    finally:
        submitit_log.removeFilter(once)
        OnceFilter.said = False
    messages = [r.getMessage() for r in caplog.records if r.name == "submitit"]
    assert messages == ["sacct failed (said once, not on every poll): Call #1 - Bypassing sacct error exit status 1, "
                        "status may be inaccurate.", "another warning"]  # fmt: skip
