"""The ``sweep`` section of ``scripts/bench.py``: what a later job of a logit-recipe sweep costs against
training the student alone, and the quickstart's cold wall time.

Runs the quickstart (``distill-run`` with no arguments, or the given overrides) in this process as a sweep
would: job 0 with an empty cache (cold: fine-tunes the teacher, computes its outputs, trains both students,
times the models), then later jobs that change only ``distill.temperature`` (everything but the KD student is
reused). Training the student alone is job 0's scratch baseline: the same student, schedule and data with
cross-entropy only. A later job's wall time is everything ``runner.run`` does (building the data and models,
reading the cache, the KD student, evaluation, the report), not the interpreter's start (in a Hydra multirun
with the basic or joblib launcher, jobs share it).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from distill_runner import runner
from distill_runner.config import compose


def _job(overrides: list[str], run_dir: Path) -> dict:
    start = time.perf_counter()
    result = runner.run(compose(overrides), run_dir)
    wall = time.perf_counter() - start
    stages = {name: round(s.wall_time_s, 2) for name, s in result.stages.items()}
    trained = sum(s.wall_time_s for s in result.stages.values() if not s.reused)
    return {
        "wall_s": round(wall, 2),
        "stages_s": stages,
        "reused": [name for name, s in result.stages.items() if s.reused],
        "eval_s": round(result.eval_time_s, 2),
        "other_s": round(wall - trained - result.eval_time_s, 2),  # setup, cache reads, teacher outputs, report
        "student_test_acc": result.models["student"].test_acc,
    }


def measure_sweep(overrides: list[str], later_jobs: int = 3) -> dict:
    """Job 0 cold, then ``later_jobs`` jobs at other temperatures; ratios against job 0's baseline."""
    temperatures = [2.0, 8.0, 1.0, 6.0, 3.0][:later_jobs]
    quiet, level = logging.getLogger("distill_runner"), logging.getLogger("distill_runner").level
    quiet.setLevel(logging.WARNING)  # the runs' INFO lines would bury the bench's output
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = [*overrides, f"cache.dir={tmp}/cache", "trainer.progress=false"]
            first = _job(base, Path(tmp) / "job0")
            later = [
                _job([*base, f"distill.temperature={t}"], Path(tmp) / f"job{i}") for i, t in enumerate(temperatures, 1)
            ]
    finally:
        quiet.setLevel(level)
    alone = first["stages_s"]["baseline"]
    for job in later:
        job["over_student_alone"] = round(job["wall_s"] / alone, 2)
        job["kd_student_over_alone"] = round(job["stages_s"]["student"] / alone, 2)
    return {
        "overrides": overrides,
        "cold_quickstart_s": first["wall_s"],
        "job0": first,
        "student_alone_s": alone,
        "later_jobs": later,
        "later_over_student_alone": [job["over_student_alone"] for job in later],
    }


if __name__ == "__main__":
    print(measure_sweep(sys.argv[1:]))
