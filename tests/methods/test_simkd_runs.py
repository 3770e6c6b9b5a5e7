"""SimKD end to end: one epoch on digits with the quickstart pair (resnet18 -> tiny CNN) and a CIFAR-zoo pair
(resnet20 -> resnet8); the KD student that is validated, checkpointed, evaluated, reported and exported is the
deployed one (student + projector + the teacher's frozen head: its parameters and MACs count them, the report says
so, the baseline is the plain student); ONNX, TorchScript and int8 exports agree with it, and distill-export of the
finished run rebuilds it; a resumed SimKD stage equals an uninterrupted one; bad settings are one line before
training."""

import functools
import math

import pytest
import torch
from conftest import TINY, compose_config
from omegaconf import OmegaConf
from one_epoch import ZOO, fit_from_seed, one_epoch, saved_teacher, teacher_fixture

from distill_runner import runner
from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.config import validate
from distill_runner.distill.signals import online_signal
from distill_runner.distill.terms.simkd import HEAD, PROJECTOR, SimKDStudent
from distill_runner.errors import ConfigError
from distill_runner.evaluation.export import export_run
from distill_runner.models.factories import count_parameters
from distill_runner.search.int8 import quantize
from distill_runner.train import engine

CPU = torch.device("cpu")
SIMKD = ("distill=simkd",)
ZOO_LAYERS = ["distill.terms.simkd.student=layer3", "distill.terms.simkd.teacher=layer3"]


quickstart = teacher_fixture([], SIMKD)


def _one_epoch(overrides, tmp_path):
    metrics, record = one_epoch(compose_config(overrides), tmp_path)
    assert math.isfinite(record["loss/simkd"]) and "val/acc" in record
    student, baseline = metrics.models["student"], metrics.models["baseline"]
    assert "SimKD" in student.name
    assert student.params > baseline.params and student.macs > baseline.macs  # projector + head counted
    assert "projector" in metrics.stages["student"].includes
    assert "The KD student includes the SimKD projector" in (tmp_path / "report.md").read_text()
    state = torch.load(tmp_path / "checkpoints" / "student.pt", weights_only=True)
    baseline_keys = set(torch.load(tmp_path / "checkpoints" / "baseline.pt", weights_only=True))
    assert baseline_keys <= set(state)  # the student part keeps its keys
    assert {k.split(".")[0] for k in set(state) - baseline_keys} == {PROJECTOR, HEAD}
    return metrics


@pytest.mark.slow
def test_one_epoch_with_the_quickstart_pair_ships_and_exports_the_composite(quickstart, tmp_path):
    metrics = _one_epoch([*quickstart, "export=onnx"], tmp_path)
    export = metrics.exports["student"]
    for fmt in ("onnx", "torchscript"):
        assert export[fmt]["agreement"] == 1.0 and export[fmt]["max_abs_diff"] < 1e-4, export
    assert export["reference_test_acc"] == pytest.approx(metrics.models["student"].test_acc)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(compose_config([*quickstart, "export=onnx"]), tmp_path / ".hydra" / "config.yaml")  # as Hydra
    again = export_run(tmp_path)  # distill-export rebuilds the deployed student before loading its checkpoint
    assert again["onnx"]["agreement"] == 1.0 and again["reference_test_acc"] == export["reference_test_acc"]
    int8 = quantize(tmp_path / export["onnx"]["path"], validate(compose_config(quickstart)), tmp_path, 32)
    assert int8["fp32"]["test_acc"] == pytest.approx(export["onnx"]["test_acc"])
    assert abs(int8["int8"]["test_acc"] - int8["fp32"]["test_acc"]) < 0.15


@pytest.mark.slow
def test_one_epoch_with_a_cifar_zoo_pair(tmp_path_factory, tmp_path):
    _one_epoch(saved_teacher(tmp_path_factory, ZOO, SIMKD) + ZOO_LAYERS, tmp_path)


class Stop(Exception):
    pass


def _stage(cfg, data, teacher, on_epoch=None):
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data, cfg.seed)
    recipe = build_recipe(cfg, data, student, teacher)
    model = recipe.deployed(student)
    assert isinstance(model, SimKDStudent) and not list(recipe.parameters())  # the projector is optimized once
    signal = online_signal([teacher], None, recipe.teacher_layers)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return engine.Stage("student", model, recipe, 2, optimizer, engine.constant_lr, signal, on_epoch)


@pytest.mark.slow
def test_a_resumed_simkd_stage_equals_an_uninterrupted_one(tmp_path):
    layers = ["distill.terms.simkd.teacher=features.2", "distill.terms.simkd.teacher_head=classifier"]
    cfg = compose_config(TINY + ["distill=simkd", "teacher=wide_cnn", "teacher.model.pool_size=1", *layers])
    data = build_data(cfg)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    whole = _stage(cfg, data, teacher)
    history = fit_from_seed(whole, data, tmp_path / "whole")

    def crash_in_epoch_2(epoch, record, model):
        if epoch == 1:
            raise Stop  # before epoch 2's checkpoint: the one after epoch 1 stays

    with pytest.raises(Stop):
        fit_from_seed(_stage(cfg, data, teacher, crash_in_epoch_2), data, tmp_path / "killed")
    resumed = _stage(cfg, data, teacher)
    again = fit_from_seed(resumed, data, tmp_path / "killed", resume=True)
    assert [h["loss/simkd"] for h in again] == [h["loss/simkd"] for h in history]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = dict(teacher.named_modules())["classifier"]
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), resumed.model.simkd_teacher_head.parameters()))
    assert count_parameters(resumed.model) > count_parameters(build_model(cfg.student, "student", data, cfg.seed))


@pytest.mark.parametrize(
    "override,key,says",
    [
        ("distill.terms.simkd.teacher=layer9", "distill.terms.simkd.teacher", "valid names:"),
        ("distill.terms.simkd.student=classifier.1", "distill.terms.simkd.student", "4-D feature map"),
        ("distill.terms.simkd.teacher_head=layer4", "distill.terms.simkd.teacher_head", "512-channel"),
        ("distill.terms.simkd.factor=1024", "distill.terms.simkd.factor", "512 channels"),
        ("+distill.terms.again={_target_:distill_runner.distill.terms.SimKD,student:features.1,teacher:layer4}",
         "distill.terms", "at most one term"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_bad_settings_are_one_line_before_training(override, key, says, quickstart, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config([*quickstart, override]), tmp_path)
    assert err.value.key == key and says in str(err.value) and "\n" not in str(err.value), str(err.value)
