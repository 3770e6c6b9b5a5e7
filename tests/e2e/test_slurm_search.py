"""distill-search workers as Slurm jobs (``-m hydra/launcher=slurm search.worker='range(0,2)'``) sharing one Optuna
study in a real PostgreSQL server: the study ends with its trials each run once by one of the jobs, none lost."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from conftest_cluster import SLURM, job_env, postgres_url_fixture, slurm_cluster_fixture  # noqa: F401 (fixtures)
from search_setup import SMALL, search_config, trials

pytest.importorskip("optuna", minversion="4")
pytest.importorskip("psycopg", reason="the search extra's PostgreSQL driver: pip install -e '.[search]'")


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_search_workers_as_slurm_jobs_share_one_study_and_run_each_trial_once(tmp_path, postgres_url):
    study = f"slurm-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "distill_runner.search", "-m", *SMALL, *search_config(tmp_path / "conf"), *SLURM,
               "search.worker=range(0,2)", f"search.storage={postgres_url}", f"search.study_name={study}",
               f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*_1/*_log.out"))) == 1  # the second job ran on Slurm

    finished = trials(postgres_url, study, "COMPLETE", "PRUNED")
    assert len(finished) == 4 and len(trials(postgres_url, study)) == 4  # none lost, failed or run again
    assert len({t.user_attrs["folder"] for t in finished}) == 4
    assert len({t.user_attrs["pid"] for t in finished}) == 2  # both jobs ran trials of the one study
    (best,) = (tmp_path / "sweep").glob("*/best.json")  # the report, in the job with search.worker=0
    assert json.loads(best.read_text())["trials"] == {"COMPLETE": 4}
    assert len(list((tmp_path / "cache" / "teachers").glob("*.model.pt"))) == 1  # the teacher fine-tuned once
