"""Each section of scripts/bench.py runs in a quick mode (tiny sizes): kd, feature, recipes, data (it crashed with
"'list' object has no attribute 'set_epoch'"), prints and speed.
The sweep section: tests/scripts/test_bench_sweep.py."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench
import bench_data
import bench_recipes
import bench_speed

from distill_runner.data import prints
from distill_runner.data.digits import digits
from distill_runner.train import engine

CPU = torch.device("cpu")


@pytest.fixture
def fp32():
    return engine.resolve_precision("32", CPU)


@pytest.mark.slow
def test_kd_and_feature_sections(fp32):
    kd = bench.measure("synthetic", bench.synthetic(32, 16, 8, 10), 10, 32, CPU, fp32, repeats=1)
    assert kd["images"] == 16 and kd["cached_over_ce"] > 0 and kd["online_over_ce"] > 0
    data = digits(image_size=32, batch_size=8, limit=16, crop_padding=2)
    feature = bench.measure_features(data, CPU, fp32, repeats=1)
    assert feature["feature"]["replayed_over_ce"] > 0 and feature["attention"]["online_over_ce"] > 0


@pytest.mark.slow
def test_recipes_section_times_feature_recipes_with_their_quickstart_overrides(fp32):
    """fsp binds only with the student its YAML names (tiny_cnn[64,128]: without it, a channel mismatch before
    training), so its row proves the overrides applied; two students, two CE timings. A named logit recipe (kd) is
    timed too; CRLD replays its strong view; AB's stage before training is timed once, apart from the epochs; DOT
    against SGD."""
    tiny = ["dataset.limit=16", "dataset.batch_size=8"]
    result = bench_recipes.measure_recipes(["kd", "rkd", "fsp", "crld", "ab", "dot"], tiny, CPU, fp32, repeats=1)
    assert set(result) == {"kd", "rkd", "fsp", "crld", "ab", "dot"}
    for name, row in result.items():
        assert row["images"] == 16
        if name != "dot":
            assert row["online_over_ce"] > 0 and row["replayed_over_ce"] > 0
    assert result["fsp"]["ce_images_per_s"] != result["rkd"]["ce_images_per_s"]  # its own, wider student
    assert result["ab"]["prepare_s"] > 0 and result["rkd"]["prepare_s"] is None
    assert result["dot"]["dot_over_sgd"] > 0


@pytest.mark.slow
def test_recipes_section_leaves_out_unnamed_logit_recipes(fp32, monkeypatch):
    monkeypatch.setattr(bench_recipes, "all_recipes", lambda: ["kd", "wsld", "pkt", "crld", "self"])
    tiny = ["dataset.limit=16", "dataset.batch_size=8"]
    assert set(bench_recipes.measure_recipes(None, tiny, CPU, fp32, repeats=1)) == {"pkt", "crld"}


def test_data_section_runs_and_reports_the_goals(tmp_path, fp32):
    result = bench_data.measure_data_path(tmp_path, CPU, fp32, quick=True, n=8, side=64)
    assert result["images"] == 8 and result["store_ce_images_per_s"] > 0 and result["pil_ce_images_per_s"] > 0
    assert set(result["goals_met"]) == {"share_of_ce_epoch<=0.05", "speedup_vs_pil>=10"}


@pytest.mark.slow
def test_prints_section_hashes_cold_then_stats_warm(tmp_path, monkeypatch):
    monkeypatch.setattr(prints, "RACY_NS", 0)  # no wait for the files just generated
    reads = []
    real = prints.sha256_of
    monkeypatch.setattr(prints, "sha256_of", lambda p: reads.append(p) or real(p))
    result = bench_data.measure_print_cost(tmp_path, n=6, side=64)
    assert result["files"] == 6 and len(reads) == 6  # cold: every file read once; warm: none
    assert result["cold_s"] > 0 and result["warm_s"] > 0 and result["index_kb"] >= 0


def test_speed_section_at_a_few_pixels():
    result = bench_speed.speed_section(CPU, images=8, repeats=1, compile_too=False, image_size=16, precisions=["32"])
    assert set(result) == {"32", "32 channels_last"}
    assert all(v > 0 for row in result.values() for v in row.values())
