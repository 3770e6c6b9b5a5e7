"""distill-run in a process of its own, as a user starts it (``python -m distill_runner``), for the tests of what
crosses processes: a kill, a resume, two runs racing for one cache, a Hydra sweep."""

import subprocess
import sys

DISTILL_RUN = [sys.executable, "-m", "distill_runner"]


def start_distill_run(*args: str, cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """distill-run started in the background (text streams; by default its log on stdout)."""
    return subprocess.Popen([*DISTILL_RUN, *args], cwd=cwd, stdout=stdout, stderr=stderr, text=True)


def distill_run(*args: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    """distill-run to its end (at most ``timeout`` seconds), its stdout and stderr captured as text."""
    return subprocess.run([*DISTILL_RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
