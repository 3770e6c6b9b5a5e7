"""The OFD, AB and FT recipes: replayed teacher outputs equal online ones (in training and in the stage before it),
each recipe runs an epoch on digits with the quickstart pair and a CIFAR-zoo pair, bad settings are one line
before training."""

import logging

import pytest
import torch
from conftest import TINY, compose_config
from replay_check import replayed_equals_online

from distill_runner import runner
from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.signals import ReplayedTeacher, compute_teacher_outputs, online_signal
from distill_runner.distill.terms.ab_ft import conv_reg
from distill_runner.errors import ConfigError
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)
ONE_EPOCH = {"ab": ["distill.terms.ab.prepare_epochs=1"], "ft": ["distill.terms.ft.prepare_epochs=1"], "ofd": []}


@pytest.fixture(scope="module")
def data_and_teacher():
    cfg = compose_config(TINY)
    data = build_data(cfg)
    torch.manual_seed(0)
    return data, build_model(cfg.teacher, "teacher", data, cfg.seed).eval()


def _recipe(name, data, extra=()):
    cfg = compose_config(TINY + [f"distill={name}", *extra])
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data, cfg.seed)
    return build_recipe(cfg, data, student), student


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("ofd", []), ("ab", ["distill.terms.ab.weight=1.0"]), ("ft", [])])
def test_replayed_equals_online_in_training(name, extra, data_and_teacher):
    data, teacher = data_and_teacher
    recipe, student = _recipe(name, data, extra)
    online = online_signal([teacher], None, recipe.teacher_layers)
    assert replayed_equals_online(recipe, student, online, data, torch.float32, 1e-5, epochs=1) == len(data.train)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ab", "ft"])
def test_the_stage_before_training_gives_the_same_result_replayed_and_online(name, data_and_teacher, caplog):
    """AB's initialised student and connectors, FT's paraphraser: the same from replayed teacher outputs."""
    data, teacher = data_and_teacher
    recipe, student = _recipe(name, data)
    before = torch.cat([p.detach().flatten() for p in [*student.parameters(), *recipe.parameters()]])
    results = []
    for replayed in (False, True):
        recipe, student = _recipe(name, data, [f"distill.terms.{name}.prepare_epochs=2"])
        online = online_signal([teacher], None, recipe.teacher_layers)
        signal = online
        if replayed:
            entry = compute_teacher_outputs(online, data.train, 2, CPU, FP32, torch.float32, False, recipe.summarize)
            signal = ReplayedTeacher(entry["logits"], entry["summaries"])
        torch.manual_seed(1)
        with caplog.at_level(logging.INFO):
            recipe.prepare(student, signal, data.train, CPU)
        results.append(torch.cat([p.detach().flatten() for p in [*student.parameters(), *recipe.parameters()]]))
    assert f"terms.{name}: prepare epoch 2/2" in caplog.text
    assert not torch.equal(results[0], before)  # it trained something
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_ft_prepares_again_with_the_same_recipe(data_and_teacher):
    """The paraphraser is frozen after its stage; a second stage with the recipe trains it again (the bench
    times several), rather than failing on parameters with no gradient."""
    data, teacher = data_and_teacher
    recipe, student = _recipe("ft", data, ["distill.terms.ft.prepare_epochs=1"])
    signal = online_signal([teacher], None, recipe.teacher_layers)
    recipe.prepare(student, signal, data.train, CPU)
    first = [p.detach().clone() for p in recipe.parameters()]
    recipe.prepare(student, signal, data.train, CPU)
    assert any(not torch.equal(a, b) for a, b in zip(first, recipe.parameters(), strict=True))
    assert not any(p.requires_grad for p in recipe.terms["ft"].encoder.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ofd", "ab", "ft"])
@pytest.mark.parametrize("pair", ["quickstart", "cifar_zoo"])
def test_each_recipe_runs_an_epoch_on_digits(name, pair, tmp_path):
    models = (
        []
        if pair == "quickstart"
        else ["teacher=cifar_resnet14", "student=cifar_resnet8", f"distill.terms.{name}.pairs=stages"]
    )
    cfg = compose_config(TINY + [f"distill={name}", *ONE_EPOCH[name], *models])
    results = runner.run(cfg, tmp_path)
    history = results.stages["student"].history
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss/total"]))


def _bad(name, overrides, data):
    with pytest.raises(ConfigError) as err:
        _recipe(name, data, overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_settings_are_one_line_before_training(data_and_teacher):
    data, _ = data_and_teacher
    text = _bad("ofd", ["teacher=cifar_ShuffleV1", "distill.terms.ofd.pairs=stages"], data)
    assert "BatchNorm" in text and "terms.ofd.pairs" in text
    text = _bad("ofd", ["distill.terms.ofd.pairs.1.teacher=layer9"], data)
    assert "layer9" in text and "stages: layer1, layer2, layer3, layer4" in text
    assert "no pre-ReLU output" in _bad("ab", ["teacher=cifar_ShuffleV2", "distill.terms.ab.pairs=stages"], data)
    assert "one pair" in _bad("ft", ['distill.terms.ft.pairs=["features.0:layer1","features.1:layer2"]'], data)
    assert "margin" in _bad("ab", ["distill.terms.ab.margin=0"], data)
    with pytest.raises(ConfigError, match="connector cannot enlarge"):
        conv_reg((8, 2, 2), (8, 8, 8))
    assert "prepare_epochs" in _bad("ft", ["distill.terms.ft.prepare_epochs=-1"], data)
