"""A sweep job requeued mid-training on a real Slurm cluster (``scontrol requeue``) runs again in its own job folder
and, with trainer.resume=auto, continues from its last finished epoch and ends with the numbers of an uninterrupted
run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest_cluster import SLURM, cancel_jobs, job_env, slurm_cluster_fixture, wait_for  # noqa: F401 (the slurm_cluster fixture)

from distill_runner.reporting.results import RunResults

TIMEOUT_S = 420
EPOCHS = 10


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--format=%T", "--jobs", job_id], capture_output=True, text=True,
                          timeout=60).stdout.strip()  # fmt: skip


def with_values(overrides: list[str], **values) -> list[str]:
    """``overrides`` with the keys of ``values`` (dots as __) set to them."""
    changed = {k.replace("__", "."): v for k, v in values.items()}
    return [o for o in overrides if o.split("=", 1)[0] not in changed] + [f"{k}={v}" for k, v in changed.items()]


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_a_requeued_job_continues_in_its_folder_and_ends_as_an_uninterrupted_run(tmp_path, fast):
    # two jobs of one config (seed=0,0): job 0 is requeued, job 1 runs through beside it (the node has 2 cores).
    # Epochs long enough (600 images) that job 0 still trains when it is killed, 2 s after the requeue.
    run = with_values(fast, trainer__epochs=EPOCHS, dataset__limit=600, distill__teacher_outputs="online")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "distill_runner", "-m", *run, "trainer.resume=auto", *SLURM, "seed=0,0",
               f"hydra.sweep.dir={sweep}"]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=tmp_path, env=job_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        last = wait_for(lambda: next(sweep.glob("0_*/checkpoints/student_last.pt"), None), 300,
                        "job 0's first student epoch", process=launcher)  # fmt: skip
        job_id = next((sweep / ".submitit").glob("*_0/*_0_0_log.out")).name.removesuffix("_0_log.out")  # 12_0
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        # Slurm holds a requeued job for 2 minutes (its begin time); once it is pending again, let it start now
        wait_for(lambda: job_state(job_id) == "PENDING", 120, "the job to be pending again", poll_s=0.5)
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True, timeout=60)
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        launcher.kill()
        cancel_jobs(sweep)
    assert launcher.returncode == 0, stderr[-3000:]
    requeued = last.parent.parent
    (whole,) = [p for p in sweep.glob("1_*") if p.is_dir()]
    assert sorted(p.name for p in sweep.glob("[0-9]*") if p.is_dir()) == sorted([requeued.name, whole.name])
    log = (requeued / "distill-run.log").read_text()  # the requeued job wrote on in its own folder
    resumed = re.search(rf"(student|baseline): resuming after epoch (\d+)/{EPOCHS}", log)
    assert resumed is not None and 1 <= int(resumed.group(2)) < EPOCHS, log[-3000:]
    assert "resuming after epoch" not in (whole / "distill-run.log").read_text()

    a, b = (RunResults.load(d / "metrics.json") for d in (requeued, whole))
    for role in ("student", "baseline"):
        assert a.models[role].test_acc == b.models[role].test_acc, role
        assert [h["loss/total"] for h in a.stages[role].history] == pytest.approx(
            [h["loss/total"] for h in b.stages[role].history], rel=1e-6
        )
