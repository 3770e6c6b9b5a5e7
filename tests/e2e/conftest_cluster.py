"""The real engines the scaling-out tests run on: a single-node Slurm cluster (scripts/slurm_cluster.sh) and a
PostgreSQL server (scripts/postgres_local.sh), each started once per session through its script. A test that
needs one is skipped, with the reason, where it cannot start (not root, the Debian packages not installed).
A test module imports them (``from conftest_cluster import slurm_cluster_fixture  # noqa: F401``) and asks
for them by name (``slurm_cluster``, ``postgres_url``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180

# Slurm jobs of a test: no GPU, one CPU each (the node has the machine's cores), little memory, a time limit
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]


def job_env() -> dict[str, str]:
    """The environment a command (and the Slurm jobs it submits, which inherit it) runs in: this Python's
    console scripts first on PATH, one thread per process (jobs share the node's cores)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def script(name: str, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture():
    """A single-node Slurm cluster (partition ``debug``), started if it is not running; left running."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm cluster needs root (it starts munged, slurmctld and slurmd)")
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("Slurm is not installed: apt-get install -y slurm-wlm munge")
    started = script("slurm_cluster.sh", "start")
    if started.returncode != 0:
        pytest.skip(f"the Slurm cluster did not start: {started.stderr.strip()}")
    return "debug"


def cancel_jobs(sweep: Path) -> None:
    """Cancel the Slurm jobs a launcher submitted from ``sweep`` (a failed test leaves none running)."""
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*") if p.name.split("_")[0].isdigit()}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", name="postgres_url")
def postgres_url_fixture():
    """The URL of a throwaway PostgreSQL database (``distill``) on a free local port, stopped after the session."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("PostgreSQL is not installed: apt-get install -y postgresql")
    folder = tempfile.mkdtemp(prefix="distill-postgres-")  # not under pytest's tmp: the postgres user must enter it
    started = script("postgres_local.sh", "start", folder, str(free_port()))
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()}")
    yield started.stdout.strip().splitlines()[-1]
    script("postgres_local.sh", "stop", folder, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2, process=None):
    """``condition()``'s first true value within ``timeout_s``; fails naming ``what`` (and ``process``'s stderr
    when it ended first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if found := condition():
            return found
        if process is not None and process.poll() is not None:
            pytest.fail(f"ended before {what}: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll_s)
