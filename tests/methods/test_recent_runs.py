"""SDD (over KD, DKD, NKD) and CAT-KD run one epoch end to end on digits with the quickstart pair (resnet18 -> tiny CNN
with pool_size 1) and a CIFAR-zoo pair (resnet20 -> resnet8, layer3 + fc); the classifier the term trains through is
the KD student's; a wrong layer or a classifier that does not take the pooled feature is one line before training."""

import math

import pytest
from conftest import TINY, compose_config
from one_epoch import ZOO, one_epoch, teacher_fixture

from distill_runner import runner
from distill_runner.errors import ConfigError

RECIPES = {"sdd_kd": "sdd", "sdd_dkd": "sdd", "sdd_nkd": "sdd", "catkd": "catkd"}
POOLED = ["student.model.pool_size=1"]  # the tiny CNN's classifier on its globally pooled feature


def zoo_layers(term: str) -> list[str]:
    return [f"distill.terms.{term}.{k}={v}" for k, v in
            (("student", "layer3"), ("teacher", "layer3"), ("student_head", "fc"), ("teacher_head", "fc"))]  # fmt: skip


quickstart = teacher_fixture(POOLED)
zoo = teacher_fixture(ZOO)


def _one_epoch(overrides, name, tmp_path, monkeypatch):
    seen = {}
    train_student = runner.train_student

    def spy(ctx, built, *args, **kwargs):  # the head the term reads is a module of the student that trains
        term = built.recipe.terms[RECIPES[name]]
        seen["head"] = any(term.heads.student is m for m in built.student.modules())
        return train_student(ctx, built, *args, **kwargs)

    monkeypatch.setattr(runner, "train_student", spy)
    _, record = one_epoch(compose_config(overrides + [f"distill={name}"]), tmp_path)
    assert seen["head"] and math.isfinite(record["loss/total"]), record
    assert math.isfinite(record[f"loss/{RECIPES[name]}"])


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_one_epoch_with_the_quickstart_pair(name, quickstart, tmp_path, monkeypatch):
    _one_epoch(quickstart, name, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_one_epoch_with_a_cifar_zoo_pair(name, zoo, tmp_path, monkeypatch):
    _one_epoch(zoo + zoo_layers(RECIPES[name]), name, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "name,override,key,says",
    [
        ("sdd_kd", "distill.terms.sdd.teacher=layer9", "distill.terms.sdd.teacher", "valid names:"),
        ("catkd", "distill.terms.catkd.student=features.9", "distill.terms.catkd.student", "valid names:"),
        ("sdd_dkd", "distill.terms.sdd.student_head=classifier.1", "distill.terms.sdd.student_head", "pool_size=1"),
        ("catkd", "distill.terms.catkd.teacher_head=layer4", "distill.terms.catkd.teacher_head", "512-channel"),
        ("sdd_nkd", "distill.terms.sdd.student=classifier.1", "distill.terms.sdd.student", "4-D feature map"),
    ],
)
@pytest.mark.slow
def test_bad_settings_are_one_line_before_training(name, override, key, says, quickstart, tmp_path):
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config(quickstart + [f"distill={name}", override]), tmp_path)
    message = str(err.value)
    assert err.value.key == key and "\n" not in message and says in message, message
    assert not list(tmp_path.rglob("*.pt"))


def test_the_tiny_cnns_default_head_asks_for_pool_size_1(tmp_path):
    """Without pool_size=1 the tiny CNN's classifier takes a 4x4 map, not the pooled feature: the fix is named."""
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config(TINY + ["distill=sdd_kd", "cache.enabled=false"]), tmp_path)
    assert err.value.key == "distill.terms.sdd.student_head" and "student.model.pool_size=1" in str(err.value)
