"""The end-of-run evaluation on tiny models (no training) and the report written from it."""

import json
from dataclasses import asdict

import pytest
import torch
from conftest import compose_config
from fake_data import two_class_data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from distill_runner.errors import ConfigError
from distill_runner.evaluation import evaluate
from distill_runner.models.factories import clone, tiny_cnn
from distill_runner.reporting import report, tensorboard
from distill_runner.reporting.results import RunResults, StageResult
from distill_runner.train import engine

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def evaluated():
    cfg = compose_config(["eval.latency_budget_s=0.01", "eval.throughput_budget_s=0.01"])
    data = two_class_data()
    torch.manual_seed(0)
    student = tiny_cnn(num_classes=2, hidden=32)
    models = {"teacher": clone(student), "student": student, "baseline": tiny_cnn(num_classes=2, hidden=32)}
    pairs = [("features.1", "features.1"), ("features.0", "features.1")]
    results, _ = evaluate.evaluate(cfg, data, models, CPU, engine.resolve_precision("32", CPU), layer_pairs=pairs)
    return cfg, data, results


def run_results(data, results, history) -> RunResults:
    stages = {s: StageResult(3, 0.7, 1.0, history) for s in ("teacher", "student", "baseline")}
    return RunResults(
        dataset=data.name, num_classes=2, class_names=data.class_names, class_counts=data.class_counts, device="cpu",
        processes=1, precision="32", seed=0, eval_batch_size=16, torch_threads=2, models=results, stages=stages,
        **evaluate.comparison(results),
    )  # fmt: skip


def test_evaluate_measures_every_model(evaluated):
    _, _, results = evaluated
    teacher, student, baseline = results["teacher"], results["student"], results["baseline"]
    for r in results.values():
        assert 0 <= r.test_acc <= 1 and 0 <= r.macro_f1 <= 1 and 0 <= r.ece <= 1 and r.roc_auc is not None
        assert r.macs * 2 == r.flops > 0 and r.size_bytes > 4 * r.params * 0.9
        assert r.latency_ms > 0 and r.latency_repeats >= 5 and r.images_per_s > 0
        assert sum(map(sum, r.confusion)) == 40 and r.per_class["support"] == [20, 20]
        assert r.penultimate_layer == "classifier.4"
    # the "teacher" is a copy of the student: the same predictions and identical features
    assert student.test_acc == teacher.test_acc and student.confusion == teacher.confusion
    assert student.cka["penultimate"] == pytest.approx(1.0) and student.cka["features.1 ~ features.1"] == pytest.approx(
        1.0
    )
    assert set(baseline.cka) == {"penultimate", "features.1 ~ features.1", "features.0 ~ features.1"}
    assert baseline.cka["penultimate"] < 1 and not teacher.cka
    assert teacher.speedup == 1 and student.compression == 1
    assert all(json.loads(json.dumps(asdict(r))) == asdict(r) for r in results.values())  # JSON-ready


def test_report_files_tables_and_tensorboard(evaluated, tmp_path):
    _, data, results = evaluated
    history = [{"loss/total": 1.0 - 0.1 * e, "val/acc": 0.5 + 0.1 * e} for e in range(3)]
    metrics = run_results(data, results, history)
    table = report.write_report(tmp_path, metrics, ["seed=0"])
    assert "student (KD)" in table and "MACs/image" in table and "latency" in table
    assert "of 40 test images)" in table  # the KD gain in images

    md = (tmp_path / "report.md").read_text()
    assert "](curves.png)" in md and "](confusion.png)" in md
    assert "## Should you ship the student?" in md and "ROC-AUC:" in md
    assert "| true \\ predicted | dim | bright |" in md and "| bright |" in md
    assert "`features.0 ~ features.1`" in md and "penultimate (input of teacher `classifier.4`" in md
    assert "not exported in this run" in md
    for png in ("curves.png", "confusion.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["models"]["student"]["confusion"]
        == results["student"].confusion
    )

    tensorboard.write_tensorboard(tmp_path / "tb", metrics, {"seed": 0}, [])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["images"]) == {"confusion/teacher", "confusion/student", "confusion/baseline"}
    assert {
        "test/student_acc",
        "test/student_macro_f1",
        "test/student_ece",
        "test/student_cka",
        "test/teacher_latency_ms",
        "test/student_macs",
        "test/student_roc_auc",
        "test/retention",
        "test/kd_gain",
    } <= set(tags["scalars"])
    assert "report/text_summary" in tags["tensors"]


def test_metrics_json_round_trips_and_the_previous_version_still_loads(evaluated, tmp_path):
    _, data, results = evaluated
    metrics = run_results(data, results, [{"loss/total": 1.0, "val/acc": 0.5}])
    metrics.exports["student"] = {"model": "student", "reference_test_acc": 0.5, "runtime": "torch"}
    metrics.save(tmp_path / "metrics.json")
    assert RunResults.load(tmp_path / "metrics.json") == metrics
    # version 1: stage "distill", one "export" record, no version key
    old = metrics.to_dict()
    del old["version"], old["exports"]
    old["stages"] = {{"student": "distill"}.get(k, k): v for k, v in old["stages"].items()}
    old["export"] = {"model": "student", "reference_test_acc": 0.5, "runtime": "torch"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert RunResults.load(tmp_path / "old.json") == metrics
    # a file too old to read, or not JSON: one line naming the file
    (tmp_path / "older.json").write_text(json.dumps({"dataset": "x", "models": {}, "stages": {}}))
    (tmp_path / "broken.json").write_text("{not json")
    for name in ("older.json", "broken.json"):
        with pytest.raises(ConfigError, match=f"RUN_DIR=.*{name}.*re-run") as err:
            RunResults.load(tmp_path / name)
        assert "\n" not in str(err.value)


def test_metrics_json_never_holds_nan(evaluated, tmp_path):
    _, data, results = evaluated
    metrics = run_results(data, results, [{"loss/total": float("nan"), "val/acc": 0.5}])
    metrics.retention = float("nan")
    metrics.save(tmp_path / "metrics.json")
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["retention"] is None


def hparams_data(tb_dir, tag):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return HParamsPluginData.FromString(acc.summary_metadata[f"_hparams_/{tag}"].plugin_data.content)


def test_hparams_tab_ticks_what_people_compare_and_names_the_run(evaluated, tmp_path):
    _, data, results = evaluated
    metrics = run_results(data, results, [{"loss/total": 1.0, "val/acc": 0.5}])
    overrides = [
        "experiment=quickstart",
        "distill.temperature=8",
        "seed=1",
        "cache.dir=elsewhere",
        "trainer.progress=false",
    ]
    cfg = compose_config(overrides)
    name = tensorboard.run_name(cfg, overrides, "kd")
    assert name == "quickstart kd T=8 alpha=0.5 seed=1"  # plumbing (cache.dir, progress) left out
    tensorboard.write_tensorboard(tmp_path / "run" / "tb", metrics, tensorboard.hparams(cfg, metrics, "kd", name), [])

    experiment = hparams_data(tmp_path / "run" / "tb", "experiment").experiment
    names = [info.name for info in experiment.hparam_infos]
    assert (
        not [n for n in names if tensorboard.plumbing(n)] and "cache.dir" not in names and "teacher.name" not in names
    )
    assert {
        "run",
        "teacher",
        "trainer.epochs",
        "teacher.model.arch",
        "teacher.epochs",
        "student.model.channels",
    } <= set(names)
    # the dashboard orders hparams by (not differs, name) and ticks the first five, and the first five metrics
    ticked = sorted(experiment.hparam_infos, key=lambda info: (not info.differs, info.name))[:5]
    assert {info.name for info in ticked} == {"recipe", "distill.temperature", "distill.alpha", "student", "seed"}
    metric_tags = [info.name.tag for info in experiment.metric_infos]
    assert metric_tags[:5] == [
        "test/student_acc",
        "test/kd_gain",
        "test/retention",
        "test/baseline_acc",
        "test/teacher_acc",
    ]

    start = hparams_data(tmp_path / "run" / "tb", "session_start_info").session_start_info
    assert start.group_name == f"{name} (run)"  # readable, and the run folder tells repeats apart
    assert start.hparams["distill.temperature"].number_value == 8 and start.hparams["seed"].number_value == 1
    assert start.hparams["student"].string_value == "tiny_cnn[16,32]" and start.hparams["recipe"].string_value == "kd"

    # a run with other models (here: no teacher) declares the same metrics: the dashboard reads one run's
    del metrics.models["teacher"]
    metrics.retention = None
    tensorboard.write_tensorboard(tmp_path / "other" / "tb", metrics, {"seed": 0}, [])
    other = hparams_data(tmp_path / "other" / "tb", "experiment").experiment
    assert [info.name.tag for info in other.metric_infos] == metric_tags
