"""Export: ONNX and TorchScript round trips, the fallback without onnxruntime, `distill-run export=onnx`
and `distill-export RUN_DIR`."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY, compose_config
from fake_data import two_class_data
from omegaconf import OmegaConf

from distill_runner import runner
from distill_runner.evaluation import export
from distill_runner.models.factories import tiny_cnn
from distill_runner.reporting.results import RunResults


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_cnn(num_classes=2, hidden=16).eval(), two_class_data()


def test_torchscript_round_trip_agrees(tiny, tmp_path):
    model, data = tiny
    result = export.export_and_check(model, data, tmp_path / "export", "student", formats=("torchscript",))
    ts = result["torchscript"]
    assert ts["path"] == "export/student.torchscript.pt" and (tmp_path / ts["path"]).is_file()
    assert ts["max_abs_diff"] < 1e-4 and ts["agreement"] == 1.0 and ts["test_acc"] == result["reference_test_acc"]


def test_onnx_round_trip_agrees_within_1e_4(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, data = tiny
    result = export.export_and_check(model, data, tmp_path / "export", "student", formats=("onnx",))
    onnx = result["onnx"]
    assert "status" not in onnx, onnx
    assert onnx["max_abs_diff"] < 1e-4 and onnx["agreement"] == 1.0 and onnx["test_acc"] == result["reference_test_acc"]
    run = export.onnx_runner(tmp_path / onnx["path"])  # the batch dimension is dynamic
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16)
        with torch.inference_mode():
            assert torch.allclose(run(x), model(x), atol=1e-4)


def test_without_the_export_extra_torchscript_still_runs_and_onnx_says_what_to_install(tiny, tmp_path, monkeypatch):
    model, data = tiny
    monkeypatch.setattr(export, "missing_modules", lambda *names: list(names))  # nothing optional is installed
    result = export.export_and_check(model, data, tmp_path / "export", "student")
    assert result["onnx"]["path"] is None and "pip install 'distill-runner[export]'" in result["onnx"]["status"]
    assert result["torchscript"]["max_abs_diff"] < 1e-4
    from distill_runner.reporting.report import export_line

    assert "onnx skipped: onnx, onnxscript not installed" in export_line(result)


def test_export_failure_is_reported_not_raised(tiny, tmp_path, monkeypatch):
    model, data = tiny

    def broken(*args):
        raise RuntimeError("unsupported operator aten::foo\nmore details")

    monkeypatch.setattr(export, "export_torchscript", broken)
    result = export.export_and_check(model, data, tmp_path / "export", "student", formats=("torchscript",))
    assert result["torchscript"]["status"] == "failed: RuntimeError: unsupported operator aten::foo"


def test_distill_export_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert export.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill-export: error: RUN_DIR=") and "no .hydra/config.yaml" in err and "\n" not in err


@pytest.mark.slow
def test_run_with_export_then_distill_export(tmp_path, capsys):
    """One tiny `distill-run export=onnx`, then `distill-export RUN_DIR --model baseline` on its folder."""
    pytest.importorskip("onnxruntime")
    run_dir = tmp_path / "run"
    small_teacher = [
        "teacher.model._target_=distill_runner.models.factories.tiny_cnn",
        "~teacher.model.arch",
        "~teacher.model.small_input",
        "+teacher.model.hidden=64",
    ]
    args = [
        *TINY,
        *small_teacher,
        "dataset.eval_batch_size=16",
        "eval.latency_budget_s=0.05",
        "eval.throughput_budget_s=0.05",
        "export=onnx",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "distill_runner", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = RunResults.load(run_dir / "metrics.json")
    student = metrics.exports["student"]
    for fmt in ("onnx", "torchscript"):
        e = student[fmt]
        assert e["max_abs_diff"] < 1e-4 and e["test_acc"] == pytest.approx(student["reference_test_acc"])
        assert (run_dir / e["path"]).is_file()
    assert student["model"] == "student" and set(metrics.exports) == {"student"}
    assert student["reference_test_acc"] == pytest.approx(metrics.models["student"].test_acc)
    assert metrics.models["student"].size_bytes == (run_dir / "checkpoints" / "student.pt").stat().st_size
    assert "## Export" in (run_dir / "report.md").read_text()
    assert (run_dir / "curves.png").is_file() and (run_dir / "confusion.png").is_file()
    log = proc.stdout + proc.stderr
    assert (
        "onnxscript." not in log and "onnx_ir" not in log and "Warning" not in log
    )  # the exporters' chatter stays out

    assert export.main([str(run_dir), "--model", "baseline"]) == 0  # what the distill-export console script runs
    assert "export (baseline): onnx max |logit diff|" in capsys.readouterr().out
    updated = RunResults.load(run_dir / "metrics.json")
    # one record per model: the baseline's export does not replace the student's
    assert updated.exports["baseline"]["model"] == "baseline" and updated.exports["student"] == student
    assert updated.models == metrics.models
    assert (run_dir / "export" / "baseline.onnx").is_file()
    assert "student (scratch) was exported" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_distill_export_checks_the_checkpoint_and_metrics_before_writing_anything(fast, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = compose_config(fast)
    runner.run(cfg, run)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra writes beside a run
    checkpoint, metrics = run / "checkpoints" / "student.pt", run / "metrics.json"
    good, before = checkpoint.read_bytes(), metrics.read_text()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF  # inside tensor data: torch.load alone would not notice
    checkpoint.write_bytes(bytes(damaged))

    def refused() -> str:
        assert export.main([str(run)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("distill-export: error: RUN_DIR=")
        assert not (run / "export").exists() and (run / "report.md").is_file()
        return line

    line = refused()
    assert f"{checkpoint} is damaged (sha256 differs" in line and f"trainer.resume={run}" in line
    assert metrics.read_text() == before
    checkpoint.write_bytes(good)
    metrics.write_text("{")  # cut short
    assert str(metrics) in refused()
    raw = json.loads(before)
    del raw["models"]["student"]
    metrics.write_text(json.dumps(raw))
    assert "names no student" in refused()
