"""CRD in training: a resumed stage equals an uninterrupted one (banks, Z and the negatives' generator are in
the checkpoint), the bank's size is stated before training, bad settings are one line before training, and the
recipe runs one epoch end to end on the quickstart pair and on a CIFAR-zoo pair."""

import functools
import logging
import math

import pytest
import torch
from conftest import TINY, compose_config
from one_epoch import fit_from_seed

from distill_runner import runner
from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.signals import online_signal
from distill_runner.errors import ConfigError
from distill_runner.train import engine

CPU = torch.device("cpu")


class Stop(Exception):
    pass


def _stage(cfg, data, teacher, epochs, on_epoch=None):
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data, cfg.seed)
    recipe = build_recipe(cfg, data, student, teacher)
    signal = online_signal([teacher], None, recipe.teacher_layers)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return engine.Stage("student", student, recipe, epochs, optimizer, engine.constant_lr, signal, on_epoch)


@pytest.mark.slow
def test_a_resumed_crd_stage_equals_an_uninterrupted_one(tmp_path):
    small = ["teacher=wide_cnn", "distill.terms.crd.teacher_layer=classifier.2", "distill.terms.crd.nce_k=64"]
    cfg = compose_config(TINY + ["distill=crd", *small])
    data = build_data(cfg)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    whole = _stage(cfg, data, teacher, 2)
    history = fit_from_seed(whole, data, tmp_path / "whole")

    def crash_in_epoch_2(epoch, record, model):
        if epoch == 1:
            raise Stop  # before epoch 2's checkpoint: the one after epoch 1 stays

    with pytest.raises(Stop):
        fit_from_seed(_stage(cfg, data, teacher, 2, crash_in_epoch_2), data, tmp_path / "killed")
    resumed = _stage(cfg, data, teacher, 2)  # new objects: a fresh bank, as a new process would build
    fresh_bank = resumed.recipe.terms["crd"].memory_s.clone()
    again = fit_from_seed(resumed, data, tmp_path / "killed", resume=True)
    assert [h["loss/crd"] for h in again] == [h["loss/crd"] for h in history]
    a, b = whole.recipe.state_dict(), resumed.recipe.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert torch.equal(a["terms.crd._extra_state"]["generator"], b["terms.crd._extra_state"]["generator"])
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    assert not torch.equal(fresh_bank, b["terms.crd.memory_s"])  # the bank moved: equality is not trivial
    assert (b["terms.crd.z"] > 0).all()


def test_the_bank_size_is_stated_and_one_too_large_for_memory_is_one_line(caplog):
    cfg = compose_config(TINY + ["distill=crd"])
    data = build_data(cfg)
    student = build_model(cfg.student, "student", data, cfg.seed)
    with caplog.at_level(logging.INFO):
        build_recipe(cfg, data, student)
    n = data.train.num_samples
    assert f"CRD memory bank (terms.crd): 2 x {n} images x 128 dims x 4 bytes" in caplog.text
    huge = compose_config(TINY + ["distill=crd", "distill.terms.crd.feat_dim=100000000000"])
    with pytest.raises(ConfigError) as err:
        build_recipe(huge, data, student)
    message = str(err.value)
    assert err.value.key == "distill.terms.crd.feat_dim" and "\n" not in message
    assert "MB is free; set distill.terms.crd.feat_dim=64 or lower" in message


@pytest.mark.parametrize("key,layer", [("student_layer", "classifier.9"), ("teacher_layer", "layer9")])
def test_a_layer_that_does_not_exist_is_one_line_listing_the_valid_ones(key, layer):
    cfg = compose_config(TINY + ["distill=crd", f"distill.terms.crd.{key}={layer}"])
    data = build_data(cfg)
    with pytest.raises(ConfigError) as err:
        build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))
    assert err.value.key == f"distill.terms.crd.{key}" and "valid names:" in str(err.value)


PAIRS = {
    "quickstart": ["experiment=quickstart"],
    "cifar_zoo": ["teacher=cifar_resnet8", "student=cifar_resnet8", "distill.terms.crd.student_layer=avgpool"],
}


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS)
def test_the_crd_recipe_runs_one_epoch(pair, tmp_path):
    cfg = compose_config(PAIRS[pair] + TINY + ["distill=crd", "cache.enabled=false", "teacher.epochs=1"])
    metrics = runner.run(cfg, tmp_path)
    history = metrics.stages["student"].history
    assert len(history) == 1 and math.isfinite(history[0]["loss/crd"]) and history[0]["loss/crd"] > 0
