"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): submitit's Slurm launcher that names the jobs that
failed on the cluster with their log files, and the job-state watcher for clusters without accounting. Imported
only with the ``sweep`` extra installed (submitit); :mod:`distill_runner.slurm` holds what runs without it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from hydra.core.utils import JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from submitit.slurm.slurm import SlurmInfoWatcher

from distill_runner.slurm import failed_jobs, report_failed


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's watcher reading ``squeue --states=all`` (in sacct's format) instead of ``sacct``."""

    def _make_command(self):
        command = super()._make_command()
        if command is None:
            return None
        ids = [command[i + 1] for i, word in enumerate(command) if word == "-j"]
        return ["squeue", "--states=all", "--noheader", "--format=%i|%T|%N", "--jobs", ",".join(ids)]

    def read_info(self, string):
        text = string.decode() if isinstance(string, bytes) else string
        return super().read_info("JobID|State|NodeList\n" + text)


class SlurmLauncher(SubmititSlurmLauncher):
    """The submitit Slurm launcher (``conf/hydra/launcher/slurm.yaml``) that, when jobs fail, names each with its
    log file (in ``failed_jobs.json``, the sweep summary of the others, and one line) instead of a traceback."""

    def launch(self, job_overrides, initial_job_idx):
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        folder = sweep_dir / ".submitit"
        before = set(folder.glob("*")) if folder.is_dir() else set()
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        except Exception:  # submitit's FailedJobError / UncompletedJobError for the first failed job
            array = newest_array(folder, before)
            if array is None:
                raise
            wait_for_array(array)  # the others still run: their results count too
            report_failed(sweep_dir, failed_jobs(folder, array, job_overrides, initial_job_idx))
        array = newest_array(folder, before)
        if array is not None and any(r.status == JobStatus.FAILED for r in returns):  # a job raised (a bug)
            report_failed(sweep_dir, failed_jobs(folder, array, job_overrides, initial_job_idx))
        return returns


def newest_array(folder: Path, before: set[Path]) -> str | None:
    """The array job this launch submitted: submitit's folder ``<sweep dir>/.submitit/<array id>``."""
    arrays = [p for p in set(folder.glob("*")) - before if p.name.isdigit()]
    return max(arrays, key=lambda p: int(p.name)).name if arrays else None


def wait_for_array(array: str, poll_s: float = 5.0) -> None:
    """Until no task of ``array`` is pending or running (each has its own time limit)."""
    while subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs", array], capture_output=True, text=True,
                         timeout=60).stdout.strip():  # fmt: skip
        time.sleep(poll_s)
