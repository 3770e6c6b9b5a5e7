"""`distill-run --help` lists the groups distill-run takes, and no other (conf/search/ is distill-search's)."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from distill_runner.cli import run_groups
from distill_runner.config import compose


@pytest.mark.slow
def test_help_lists_only_the_groups_distill_run_takes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distill_runner", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = proc.stdout.split("Groups and their options:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    groups = {line.split(":", 1)[0] for line in listed}
    assert groups == {"dataset", "distill", "experiment", "student", "teacher", "trainer"}, listed
    assert "\n".join(listed) == run_groups()
    for line in listed:  # every option listed composes
        group, options = line.split(": ", 1)
        first = options.split(", ")[0]
        assert OmegaConf.select(compose([f"{group}={first}"]), group) is not None or group == "experiment"
