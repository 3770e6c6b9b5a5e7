"""CAT-KD (distill_runner.distill.terms.catkd) against the official code (GzyAftermath/CAT-KD 4467073: CAT_loss on the
_test models' CAMs): value, student feature-map and student-classifier gradients in tests/reference/catkd.json; the
recipe's official per-pair CIFAR-100 setting (not the code's defaults); bad settings named by key."""

from pathlib import Path

import pytest
import torch
from conftest import reference_cases
from omegaconf import OmegaConf
from relation_reference import STATE, assert_head_term_official, linear
from torch import nn

from distill_runner.distill.terms.catkd import CATKD, cat_loss, class_activation_maps
from distill_runner.distill.terms.sdd import _Heads
from distill_runner.errors import ConfigError

CASES = reference_cases("catkd")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_gradients(name):
    case = CASES[name]
    term = CATKD("s", "t", resolution=case["resolution"], normalize=case["normalize"])
    student_head = linear(case["student_head"])
    term.heads = _Heads(student_head, linear(case["teacher_head"]))  # what bind finds in the models
    assert_head_term_official(term, student_head, case, {}, STATE)  # STATE: TermState(4.0, 0.5, 1.0)


@pytest.mark.parametrize("name", CASES)
def test_plain_functions_match_the_official_value(name):
    case = CASES[name]
    cams = [class_activation_maps(torch.tensor(case[f"{side}"][0]), linear(case[f"{side}_head"]))
            for side in ("student", "teacher")]  # fmt: skip
    assert cat_loss(*cams, case["resolution"], case["normalize"]).item() == pytest.approx(case["loss"], rel=1e-5)


def test_a_head_that_is_not_linear_runs_per_position():
    head = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 5, 5)
    expected = head(x[:, :, 1, 3])
    torch.testing.assert_close(class_activation_maps(x, head)[:, :, 1, 3], expected)


def test_recipe_is_the_official_res32x4_res8x4_setting():
    recipe = OmegaConf.load(CONF / "catkd.yaml")
    term = recipe.terms.catkd
    assert (recipe.terms.ce.weight, term.weight, term.resolution, term.normalize) == (1.0, 15.0, 2, False)


@pytest.mark.parametrize("key,value", [("resolution", 0), ("resolution", 2.5), ("normalize", "yes")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        CATKD("s", "t", **{key: value})
    assert err.value.key == key
