"""Sweeps on Slurm (``hydra/launcher=slurm``, or the plugin's own ``submitit_slurm``): one line where Slurm is not
installed; on a cluster without accounting (no slurmdbd: ``sacct`` answers "accounting storage is disabled") job
states come from ``squeue`` and submitit's "Bypassing sacct error" is said once, not on every poll; jobs that
fail on the cluster are named, with their log files, in the sweep summary and in one line at the end.

Docs: docs/guide/scaling-out.md
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SLURM_LAUNCHERS = ("slurm", "submitit_slurm")
FAILED_JOBS = "failed_jobs.json"  # in the sweep folder: read by the sweep summary


def check_installed(app: str, launcher: str | None) -> None:
    """``hydra/launcher=slurm`` on a machine without Slurm: one line and exit 2 (submitit would raise
    'Could not detect "srun"' with a traceback after composing the whole sweep)."""
    if launcher not in SLURM_LAUNCHERS or shutil.which("sbatch") is not None:
        return
    print(f"{app}: error: hydra/launcher={launcher}: Slurm is not installed here (no sbatch on PATH); run the sweep "
          "on the cluster's login node, or on this machine with hydra/launcher=joblib (jobs in parallel) or "
          "without hydra/launcher (one job after another)", file=sys.stderr)  # fmt: skip
    sys.exit(2)


class OnceFilter(logging.Filter):
    """Lets the first "Bypassing sacct error" through, with what it means, and drops the repeats."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if OnceFilter.said:
            return False
        OnceFilter.said = True
        record.msg, record.args = "sacct failed (said once, not on every poll): %s", (record.getMessage(),)
        return True


def accounting_disabled() -> bool:
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.split("=")[-1].strip() == "accounting_storage/none"
               for line in config.splitlines() if line.startswith("AccountingStorageType"))  # fmt: skip


def quiet_sacct() -> None:
    """Submitit polls ``sacct``; where accounting is disabled it asks ``squeue`` instead (which knows finished
    jobs for the cluster's MinJobAge), and a sacct failure is logged once."""
    logging.getLogger("submitit").addFilter(OnceFilter())
    if not accounting_disabled():
        return
    from submitit.slurm import slurm

    from hydra_plugins.distill_runner_slurm.slurm_launcher import SqueueWatcher

    slurm.SlurmJob.watcher = SqueueWatcher(delay_s=600)  # the class's shared watcher, as submitit itself sets it
    log.info("Slurm accounting is disabled on this cluster: job states come from squeue")


def prepare(app: str, args: list[str], launcher: str | None) -> None:
    """Before Hydra starts a multirun on Slurm: Slurm is installed, sacct's failures are quiet."""
    if launcher not in SLURM_LAUNCHERS or not {"-m", "--multirun"} & set(args):
        return
    check_installed(app, launcher)
    from hydra.core.plugins import Plugins

    from hydra_plugins.distill_runner_slurm.slurm_launcher import SlurmLauncher

    Plugins.instance().register(SlurmLauncher)  # an editable install hides it from Hydra's scan of hydra_plugins
    quiet_sacct()


def failed_jobs(folder: Path, array: str, job_overrides, first: int) -> list[dict]:
    """The jobs of array job ``array`` with no successful result, each with its overrides and log file."""
    from distill_runner.reporting.sweep import job_folder

    failed = []
    for i, overrides in enumerate(job_overrides):
        job = folder / f"{array}_{i}"
        result, err = job / f"{array}_{i}_0_result.pkl", job / f"{array}_{i}_0_log.err"
        try:
            with result.open("rb") as f:
                outcome, value = pickle.load(f)  # ("success", Hydra's JobReturn) or ("error", traceback)
            ok = outcome == "success" and getattr(getattr(value, "status", None), "name", "") != "FAILED"
        except Exception:  # no result: killed, out of memory or time, exited (distill-run's one-line errors)
            ok = False
        if not ok:
            name = job_folder(first + i, list(overrides))  # the job's folder name: what the sweep varies
            failed.append({"job": name, "overrides": " ".join(overrides), "log": str(err), "why": last_line(err)})
    return failed


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log file"
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("srun: ")]
    return (errors or lines or ["empty log"])[-1].strip()[:300]


def report_failed(sweep_dir: Path, failed: list[dict]) -> None:
    """Write ``failed_jobs.json``, the summary of the jobs that finished, and exit with one line."""
    from distill_runner.io.storage import atomic_write_text
    from distill_runner.reporting.sweep import write_summary

    atomic_write_text(sweep_dir / FAILED_JOBS, json.dumps(failed, indent=2))
    with contextlib.suppress(FileNotFoundError):  # no job finished: the failures are all there is to say
        write_summary(sweep_dir)
    named = "; ".join(f"job {f['job']}: {f['log']}" for f in failed)
    print(f"distill-run: error: {len(failed)} of the sweep's jobs failed on the cluster: {named} "
          f"(listed in {sweep_dir / FAILED_JOBS})", file=sys.stderr)  # fmt: skip
    sys.exit(1)
