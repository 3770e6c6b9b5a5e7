"""RKD (distill_runner.distill.terms.relation) against the official code: RepDistiller's RKDLoss and the paper's
own repository (lenscloth/RKD RkdDistance + RKdAngle), values and student gradients in tests/reference/rkd.json."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term, tensors

from distill_runner.distill.terms.relation import RKD, rkd_loss
from distill_runner.errors import ConfigError

CASES = cases("rkd")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    loss, grads = run_term(bound(RKD("s", "t", w_d=case["w_d"], w_a=case["w_a"]), 1), case)
    assert_official(loss, grads, case)


@pytest.mark.parametrize("name", CASES)
def test_plain_function_matches_the_official_value(name):
    case = CASES[name]
    (s,), (t,) = tensors(case)
    loss = rkd_loss(s.flatten(1), t.flatten(1), case["w_d"], case["w_a"])
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)


def test_recipe_is_the_official_cifar100_setting():
    term = OmegaConf.load(CONF / "rkd.yaml").terms.rkd
    assert (term.weight, term.w_d, term.w_a) == (1.0, 25.0, 50.0)


@pytest.mark.parametrize("key,value", [("w_d", -1.0), ("w_a", "big"), ("pool", "yes")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        RKD("s", "t", **{key: value})
    assert err.value.key == key
