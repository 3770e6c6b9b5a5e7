"""NST (distill_runner.distill.terms.feature_maps) against RepDistiller's NSTLoss (the authors' code is MXNet):
values and student gradients in tests/reference/nst.json, over several layers, sizes and channel counts."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term, tensors

from distill_runner.distill.terms.feature_maps import NST, nst_loss

CASES = cases("nst")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    loss, grads = run_term(bound(NST(["s:t"]), len(case["student"])), case)
    assert_official(loss, grads, case)


def test_plain_function_sums_to_the_official_value():
    case = CASES["two_layers_mixed_sizes"]
    student, teacher = tensors(case)
    assert sum(nst_loss(s, t) for s, t in zip(student, teacher)).item() == pytest.approx(case["loss"], rel=1e-5)


def test_recipe_is_the_official_cifar100_setting():
    assert OmegaConf.load(CONF / "nst.yaml").terms.nst.weight == 50.0
