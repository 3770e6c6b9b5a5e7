"""`distill-run` as a user runs it: a subprocess, Hydra run folder, outputs on disk."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from distill_runner.reporting.results import RunResults


def distill_run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "distill_runner", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def scalars(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_end_to_end_writes_metrics_report_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    proc = distill_run(*TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics = RunResults.load(run_dir / "metrics.json")
    for role in ("teacher", "student", "baseline"):
        m = metrics.models[role]
        assert 0 <= m.test_acc <= 1 and m.params > 0 and m.images_per_s > 0
    assert metrics.models["student"].params == metrics.models["baseline"].params
    assert metrics.models["teacher"].params > 50 * metrics.models["student"].params
    assert metrics.retention == pytest.approx(metrics.models["student"].test_acc / metrics.models["teacher"].test_acc)

    report = (run_dir / "report.md").read_text()
    assert "student (KD)" in report and "student (scratch)" in report and "| teacher |" in report

    for name in ("teacher.pt", "student.pt", "baseline.pt"):
        assert (run_dir / "checkpoints" / name).is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    distill = scalars(run_dir / "tb" / "student")
    assert (
        len(distill["loss/kd"]) == 2
        and len(distill["loss/ce"]) == 2
        and len(distill["val/acc"]) == 2
        and "lr" in distill
    )
    assert scalars(run_dir / "tb" / "baseline")["loss/ce"]
    assert scalars(run_dir / "tb" / "teacher")["val/acc"]
    final = scalars(run_dir / "tb")
    assert final["test/student_acc"] == [pytest.approx(metrics.models["student"].test_acc)]
    # HParams live in the run's own tb/ folder, next to those scalars
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert "_hparams_/experiment" in acc.summary_metadata and "_hparams_/session_start_info" in acc.summary_metadata
    # the session is named by experiment, recipe and overrides, not by the run folder's timestamp alone
    start = HParamsPluginData.FromString(acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content)
    assert start.session_start_info.group_name.startswith("quickstart kd T=4 alpha=0.5 dataset.image_size=16")
    group = start.session_start_info.group_name  # the run's settings, then its folder
    assert "teacher.epochs=1 trainer.epochs=2" in group and group.endswith(" (run)")


@pytest.mark.parametrize(
    "override,key",
    [
        ("distill.alpha=1.5", "distill.alpha"),
        ("distill.temperature=0", "distill.temperature"),
        ("student=mobilenet_v2 student.model.arch=resnet999", "student.model.arch"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("teacher.checkpoint=/nonexistent/teacher.pt", "teacher.checkpoint"),
        ("teacher.model.arch=inception_v3", "teacher.model.arch"),  # needs 75 px, the run has 16
    ],
)
@pytest.mark.slow
def test_bad_override_is_one_line_naming_the_key(tmp_path, override, key):
    proc = distill_run(*TINY, *override.split(), f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert key in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unknown_student_config_names_the_group(tmp_path):
    proc = distill_run("student=resnet999", cwd=tmp_path)
    assert proc.returncode != 0
    assert "student/resnet999" in proc.stderr.splitlines()[0] and "tiny_cnn" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_user_config_dir_adds_an_experiment(tmp_path):
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /student: mobilenet_v3_small\ndistill:\n  temperature: 7.0\n"
    )
    proc = distill_run("--config-dir", str(tmp_path / "my_conf"), "experiment=mine", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "temperature: 7.0" in proc.stdout and "arch: mobilenet_v3_small" in proc.stdout


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_naming_stage_epoch_batch_and_terms(tmp_path):
    # A learning rate this large makes the KD student's loss non-finite within its first epochs.
    proc = distill_run(
        *TINY, "trainer.epochs=3", "trainer.optimizer.lr=1e30", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    (line,) = [text for text in proc.stderr.splitlines() if "error" in text]
    assert (
        "non-finite loss in stage student" in line
        and "batch" in line
        and "kd=" in line
        and "Traceback" not in proc.stderr
    )
    assert (tmp_path / "run" / "checkpoints" / "teacher.pt").is_file()  # finished stages are kept


@pytest.mark.slow
def test_help_names_the_groups_the_keys_and_examples(tmp_path):
    proc = distill_run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    text = proc.stdout
    assert text.startswith("distill-run: fine-tune a teacher, distill a student")
    recipes = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "distill").glob("*.yaml"))
    assert f"distill: {', '.join(recipes)}" in text
    assert "distill-run -m distill.temperature=1,4,8" in text and "trainer.progress" in text
    assert "Powered by Hydra" not in text  # not Hydra's generic page


@pytest.mark.slow
def test_progress_bars_stay_out_of_redirected_output_and_the_log_is_named_for_the_program(tmp_path):
    run_dir = tmp_path / "run"
    proc = distill_run(*TINY, "trainer.progress=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr + proc.stdout and "it/s]" not in proc.stderr  # no tqdm refreshes
    assert (run_dir / "distill-run.log").is_file() and not (run_dir / "cli.log").exists()
