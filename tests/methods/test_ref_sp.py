"""SP (distill_runner.distill.terms.relation) against RepDistiller's Similarity (rows L2-normalized, the default)
and torchdistill's SPKDLoss (L1, row_norm: l1): values and student gradients in tests/reference/sp.json."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term, tensors

from distill_runner.distill.terms.relation import SimilarityPreserving, sp_loss
from distill_runner.errors import ConfigError

CASES = cases("sp")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    loss, grads = run_term(bound(SimilarityPreserving("s", "t", row_norm=case["row_norm"]), 1), case)
    assert_official(loss, grads, case)


def test_the_two_row_norms_differ_and_each_matches_its_framework():
    case = CASES["torchdistill_maps_B6"]
    (s,), (t,) = tensors(case)
    l1, l2 = sp_loss(s.flatten(1), t.flatten(1), "l1"), sp_loss(s.flatten(1), t.flatten(1), "l2")
    assert l1.item() == pytest.approx(case["loss"], rel=1e-5) and abs(l2.item() - case["loss"]) > 1e-3


def test_recipe_is_the_official_cifar100_setting_with_repdistillers_norm():
    term = OmegaConf.load(CONF / "sp.yaml").terms.sp
    assert (term.weight, term.row_norm) == (3000.0, "l2")


def test_a_bad_row_norm_names_the_key():
    with pytest.raises(ConfigError) as err:
        SimilarityPreserving("s", "t", row_norm="l3")
    assert err.value.key == "row_norm"
