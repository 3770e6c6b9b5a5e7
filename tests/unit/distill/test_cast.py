"""Who is in a run's results: every teacher of a multi-teacher recipe, no teacher where the recipe
needs none, and each model under its real architecture (issue 15 items 5 and 9)."""

import json

import pytest
from conftest import TINY, compose_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill_runner import runner
from distill_runner.errors import ConfigError

CNN = "distill.teachers.cnn"


@pytest.mark.slow
def test_multi_teacher_reports_every_teacher_under_its_real_architecture(tmp_path):
    overrides = ["distill=multi_teacher", f"{CNN}.epochs=1", "teacher.model.arch=efficientnet_b0",
                 "student.model.channels=[8,16]"]  # fmt: skip
    results = runner.run(compose_config(TINY + overrides), tmp_path / "run", overrides)
    assert list(results.models) == ["teacher", CNN, "student", "baseline"]
    assert set(results.stages) >= {"teacher", CNN, "student", "baseline"}
    # the config still calls them resnet18 and tiny_cnn: the labels come from the models
    assert results.models["teacher"].name == "efficientnet_b0"
    assert results.models[CNN].name == "tiny_cnn[64,128,256]"
    assert results.models["student"].name == results.models["baseline"].name == "tiny_cnn[8,16]"
    # retention keeps its meaning: relative to the run's first teacher
    assert results.retention == pytest.approx(results.models["student"].test_acc / results.models["teacher"].test_acc)
    assert results.models[CNN].speedup == pytest.approx(
        results.models[CNN].images_per_s / results.models["teacher"].images_per_s
    )
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(written["models"]) == ["teacher", CNN, "student", "baseline"]
    assert written["models"][CNN]["test_acc"] == results.models[CNN].test_acc

    report = (tmp_path / "run" / "report.md").read_text()
    assert "| teacher | efficientnet_b0 |" in report and "| teacher (cnn) | tiny_cnn[64,128,256] |" in report
    assert "`teacher` is the run's first teacher: retention" in report
    assert "### teacher (cnn)" in report  # its confusion matrix too
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"test/teacher_cnn_acc", "test/teacher_acc", "test/student_acc"} <= set(acc.Tags()["scalars"])
    assert "confusion/distill.teachers.cnn" in acc.Tags()["images"]


def test_self_distillation_trains_and_reports_no_teacher(tmp_path, caplog):
    with caplog.at_level("INFO"):
        results = runner.run(compose_config(TINY + ["distill=self"]), tmp_path / "run")
    assert "fine-tuning teacher" not in caplog.text and "stage teacher" not in caplog.text
    assert "teacher: none in this run (the recipe needs no teacher" in caplog.text
    assert list(results.models) == ["student", "baseline"] and "teacher" not in results.stages
    assert results.retention is None and "reference_teacher=true" in results.retention_reason
    assert results.models["student"].speedup is None and not results.models["student"].cka
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["retention"] is None and written["retention_reason"] == results.retention_reason
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| teacher |" not in report and "No teacher in this run" in report
    assert not (tmp_path / "run" / "checkpoints" / "teacher.pt").exists()


@pytest.mark.slow
def test_self_distillation_with_a_reference_teacher_on_request(tmp_path, caplog):
    with caplog.at_level("INFO"):
        results = runner.run(compose_config(TINY + ["distill=self", "reference_teacher=true"]), tmp_path / "run")
    assert "fine-tuning teacher" in caplog.text
    assert list(results.models) == ["teacher", "student", "baseline"] and results.retention is not None
    assert results.retention_reason is None


def test_reference_teacher_takes_auto_true_or_false():
    with pytest.raises(ConfigError, match="reference_teacher='maybe': use auto, true or false"):
        runner.run(compose_config(TINY + ["distill=self", "reference_teacher=maybe"]), "run")
