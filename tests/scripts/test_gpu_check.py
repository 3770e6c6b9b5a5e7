"""scripts/gpu_check.sh, the GPU acceptance matrix, checked on a CPU: the no-CUDA exit, every row's
config, the generated X-ray folder, how results are judged and tabled. (The runs themselves need CUDA.)"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from distill_runner.build import build_data
from distill_runner.config import validate

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu_check would run the matrix")
def test_without_cuda_it_prints_one_line_and_exits_77(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "gc")],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 77
    assert (proc.stdout + proc.stderr).splitlines() == [gpu_check.NO_CUDA]
    assert not (tmp_path / "gc").exists()


@pytest.mark.slow
@pytest.mark.parametrize("quick", [False, True])
def test_every_row_of_the_matrix_composes_a_valid_config(tmp_path, quick, capsys):
    rows = gpu_check.matrix(tmp_path / "gc", quick, gpus=2, imagenet=False)
    names = [r.name for r in rows]
    assert names == [
        "quickstart-32",
        "quickstart-16-mixed",
        "quickstart-bf16-mixed",
        "quickstart-32-channels_last-compile",
        "sweep-2x2",
        "xray_kd-224px-on_device",
        "bench-kd",
        "bench-speed",
        "torchrun-nccl",
    ]
    composed = 0
    for row in rows:
        if row.kind == "bench":
            continue
        assert row.argv[-len(row.overrides) :] == row.overrides  # the command runs exactly these overrides
        jobs = row.jobs()
        assert len(jobs) == (4 if row.kind == "sweep" else 1), row.name
        for overrides in jobs:
            cfg = compose_config(overrides)
            validate(cfg)  # a misspelt key or a bad value fails here, on a CPU
            assert cfg.trainer.device == "cuda" and cfg.trainer.progress is False
            assert cfg.trainer.epochs == (2 if quick else 10), row.name
            composed += 1
    assert composed == 4 + 4 + 1 + 1
    xray = compose_config(rows[5].jobs()[0])
    assert (xray.dataset.name, xray.dataset.image_size, xray.data.on_device) == ("chest_xray", 224, True)
    assert xray.teacher.epochs == (1 if quick else 3)
    assert compose_config(rows[1].jobs()[0]).trainer.precision == "16-mixed"
    speed = compose_config(rows[3].jobs()[0]).trainer
    assert speed.channels_last is True and speed.compile is True
    # every row has its own run folder and its own (cold) cache
    folders = [
        o for r in rows for o in r.overrides if o.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "cache.dir="))
    ]
    assert len(folders) == len(set(folders)) == 2 * 7
    assert rows[-1].argv[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "distill_runner"]

    # --dry-run prints every row's command (here without CUDA) and runs nothing
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "gc")] + (["--quick"] if quick else [])) == 0
    printed = capsys.readouterr().out
    for row in rows:
        assert gpu_check.shlex.join(row.argv) in printed, row.name
    assert not (tmp_path / "gc").exists()


def test_the_bench_flags_the_matrix_uses_exist():
    """Read from bench.py's argparse calls (not by running it: its imports need the whole package)."""
    flags = {}
    for node in ast.walk(ast.parse((ROOT / "scripts" / "bench.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            choices = [
                ast.literal_eval(k.value)
                for k in node.keywords
                if k.arg == "choices" and isinstance(k.value, (ast.Tuple, ast.List))
            ]
            flags[ast.literal_eval(node.args[0])] = choices[0] if choices else None
    assert "--quick" in flags and {"kd", "speed"} <= set(flags["--only"])


def test_the_generated_xray_folder_loads_as_xray_kd_expects(tmp_path):
    rows = gpu_check.matrix(tmp_path / "gc", quick=True, gpus=1, imagenet=False)
    xray = next(r for r in rows if r.name.startswith("xray_kd"))
    gpu_check.make_xray_folder(tmp_path / "gc" / "data" / "chest_xray", quick=True)
    assert {p.suffix for p in (tmp_path / "gc" / "data" / "chest_xray" / "train" / "NORMAL").iterdir()} == {
        ".jpeg",
        ".png",
    }
    cfg = compose_config([o for o in xray.jobs()[0] if o != "trainer.device=cuda"] + ["trainer.device=cpu"])
    data = build_data(cfg)
    assert data.class_names == ["NORMAL", "PNEUMONIA"] and data.image_size == 224
    assert sum(data.class_counts["test"]) == 16 and sum(map(sum, data.class_counts.values())) == 2 * (24 + 8)


def _metrics(precision="32", device="cuda:0", acc=0.98, processes=1):
    model = {"test_acc": acc}
    history = [{"epoch_time_s": 2.0}, {"epoch_time_s": 1.0}, {"epoch_time_s": 1.0}]
    return {
        "device": device,
        "precision": precision,
        "processes": processes,
        "class_counts": {"train": [500, 500], "val": [50, 50], "test": [100, 100]},
        "models": {"teacher": model, "student": model, "baseline": model},
        "stages": {"student": {"history": history}, "teacher": {"reused": True}},
    }


def test_a_run_is_judged_from_its_metrics(tmp_path):
    row = gpu_check.matrix(tmp_path, False, 1, False)[1]  # quickstart-16-mixed, acceptance floor
    row.run_dir.mkdir()
    (row.run_dir / "metrics.json").write_text(json.dumps(_metrics("16-mixed")))
    ok = gpu_check.judge(row, "")
    assert (ok.status, ok.student, ok.precision, ok.images_per_s) == ("ok", 0.98, "16-mixed", 1000.0)
    (row.run_dir / "metrics.json").write_text(json.dumps(_metrics("32", device="cpu", acc=0.5)))
    bad = gpu_check.judge(row, "")
    assert bad.status == "FAIL"
    assert bad.detail == (
        "ran on cpu, not CUDA; precision 32, asked 16-mixed; teacher test acc 0.5000 < 0.85; "
        "student test acc 0.5000 < 0.85; baseline test acc 0.5000 < 0.85"
    )


def test_the_bench_rows_read_the_json_it_prints_last(tmp_path):
    kd, speed = [r for r in gpu_check.matrix(tmp_path, True, 1, False) if r.kind == "bench"]
    figures = {
        "cached_kd_images_per_s": 900.0,
        "ce_images_per_s": 1000.0,
        "cached_over_ce": 1.11,
        "online_over_ce": 3.0,
    }
    out = "device cuda\n" + json.dumps({"device": "cuda", "precision": "32", "32px": figures, "224px": figures})
    res = gpu_check.judge(kd, out)
    assert res.status == "ok" and res.images_per_s == 900.0
    assert "224px: replayed KD 900 vs CE 1000 img/s (epoch x1.11)" in res.detail
    configs = {"32": (100.0, 10.0), "16-mixed": (180.0, 30.0), "bf16-mixed": (150.0, 25.0)}
    sp = {k: {"student_images_per_s": s, "teacher_images_per_s": t} for k, (s, t) in configs.items()}
    res = gpu_check.judge(speed, json.dumps({"device": "cuda", "speed": sp}))
    assert res.status == "ok" and res.precision == "32/16-mixed/bf16-mixed"
    assert res.detail == (
        "16-mixed/32: student x1.80, teacher x3.00; bf16-mixed/32: student x1.50, teacher x2.50; "
        "fastest teacher: 16-mixed"
    )
    assert gpu_check.judge(speed, "Traceback ...").status == "FAIL"


def test_the_failure_reason_is_one_line():
    hydra = "Error executing job with overrides: []\nTraceback:\n  x\ntorch.OutOfMemoryError: CUDA out of memory\n"
    assert gpu_check.reason(hydra + "Set the environment variable HYDRA_FULL_ERROR=1") == (
        "torch.OutOfMemoryError: CUDA out of memory"
    )
    assert gpu_check.reason("x\ndistill-run: error: distill.alpha=1.5: must be in [0, 1]\n") == (
        "distill-run: error: distill.alpha=1.5: must be in [0, 1]"
    )
    torchrun = "RuntimeError: NCCL error\n...\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    assert gpu_check.reason(torchrun) == "RuntimeError: NCCL error"


def test_one_table_and_a_failed_row_makes_the_exit_code_1():
    R = gpu_check.Result
    results = [
        R("quickstart-32", "ok", 41.6, 0.9972, 0.9916, 0.9861, "32", 12345.0),
        R("sweep-2x2", "ok", 80.0, "0.9972", "0.986-0.992", "0.9861", "32", 11000.0, "4 jobs"),
        R("bench-speed", "FAIL", 3.0, detail="exit 1: RuntimeError: CUDA error: no kernel image"),
        R("torchrun-nccl", "skip", detail="skipped, 1 GPU"),
    ]
    table = gpu_check.format_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["row", "status", "wall"]
    assert lines[2].split() == ["quickstart-32", "ok", "42", "0.9972", "0.9916", "0.9861", "32", "12,345"]
    assert lines[4].split()[:3] == ["bench-speed", "FAIL", "3"]
    assert lines[4].endswith("exit 1: RuntimeError: CUDA error: no kernel image")
    assert lines[5].split() == ["torchrun-nccl", "skip", "-", "-", "-", "-", "-", "-", "skipped,", "1", "GPU"]
    assert lines[-1] == "4 rows: 1 failed, 1 skipped"
    assert gpu_check.exit_code(results) == 1
    assert gpu_check.exit_code([r for r in results if r.status != "FAIL"]) == 0
