"""scripts/slurm_torchrun.sbatch on a real single-node Slurm cluster: srun starts torchrun, which runs two gloo
processes on CPU; one distributed run ends in the job's run folder outputs/slurm/<job id>."""

from __future__ import annotations

import subprocess

import pytest
from conftest_cluster import REPO, free_port, job_env, slurm_cluster_fixture  # noqa: F401 (the slurm_cluster fixture)

from distill_runner.reporting.results import RunResults


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_the_torchrun_batch_script_runs_one_run_in_two_gloo_processes(tmp_path, fast):
    env = {**job_env(), "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    # the script's #SBATCH lines ask for 2 GPU nodes; the command line asks for what this node has
    resources = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=4G",
                 "--time=10", "--output=slurm-%j.out", "--wait"]  # fmt: skip
    done = subprocess.run(["sbatch", *resources, str(REPO / "scripts" / "slurm_torchrun.sbatch"), *fast],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)  # fmt: skip
    job_id = done.stdout.split()[-1] if done.stdout.startswith("Submitted batch job") else "?"
    output = (tmp_path / f"slurm-{job_id}.out").read_text() if job_id != "?" else done.stderr
    assert done.returncode == 0, output[-3000:]
    run = tmp_path / "outputs" / "slurm" / job_id
    results = RunResults.load(run / "metrics.json")
    assert results.processes == 2
    assert "rank 0 of 2, backend gloo" in (run / "distill-run.log").read_text()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["slurm"]  # rank 1 wrote no folder of its own
