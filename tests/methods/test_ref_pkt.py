"""PKT (distill_runner.distill.terms.relation) against the author's code as RepDistiller ships it
(distiller_zoo/PKT.py): values and student gradients in tests/reference/pkt.json."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term, tensors

from distill_runner.distill.terms.relation import PKT, pkt_loss

CASES = cases("pkt")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    loss, grads = run_term(bound(PKT("s", "t"), 1), CASES[name])
    assert_official(loss, grads, CASES[name])


@pytest.mark.parametrize("name", CASES)
def test_plain_function_matches_the_official_value(name):
    (s,), (t,) = tensors(CASES[name])
    assert pkt_loss(s, t).item() == pytest.approx(CASES[name]["loss"], rel=1e-5)


def test_recipe_is_the_official_cifar100_setting():
    assert OmegaConf.load(CONF / "pkt.yaml").terms.pkt.weight == 30000.0
