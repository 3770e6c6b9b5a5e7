"""The bench's sweep section runs (tiny settings): job 0 cold, a later job reusing everything but the KD student."""

import logging
import sys
from pathlib import Path

import pytest
from conftest import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_sweep


@pytest.mark.slow
def test_sweep_section_reuses_all_but_the_kd_student_and_reports_ratios():
    level = logging.getLogger("distill_runner").level
    out = bench_sweep.measure_sweep([*TINY, "eval.latency_budget_s=0.01", "eval.throughput_budget_s=0.01"], 1)
    first, (later,) = out["job0"], out["later_jobs"]
    assert first["reused"] == [] and sorted(later["reused"]) == ["baseline", "teacher"]
    assert out["student_alone_s"] == first["stages_s"]["baseline"] > 0
    assert later["over_student_alone"] == round(later["wall_s"] / out["student_alone_s"], 2)
    assert out["cold_quickstart_s"] == first["wall_s"] > later["wall_s"]
    assert all(v >= 0 for v in (later["eval_s"], first["eval_s"])) and 0 <= later["student_test_acc"] <= 1
    assert logging.getLogger("distill_runner").level == level  # other tests read the runner's INFO lines
